"""Which catalog ids a Run needs: the checkpoint, LoRAs and ControlNets it selects, the tool's
fixed models (``base_model``, ``preset``) and the components its pipeline always loads and the
condition estimators its ControlNets need (both declared by the tool,
``easel.tools.base.ToolDeclaration``). Used by
``easel models pull --tool/--seeds`` to fetch ahead of time exactly what those Runs load."""
from __future__ import annotations

from typing import Any

from easel.catalog import ModelCatalog, ToolSpec


# The model fields of the five seed pages' own example requests (../shared/seeds, "Run Command");
# every other field of those requests selects no weights.
SEED_REQUESTS: dict[str, dict[str, Any]] = {
    "wiro/ic-light-background": {"selectedModel": "", "selectedModelPrivate": ""},
    "wiro/instant-id-controlnet-lora": {"selectedModel": "", "selectedModelPrivate": "", "selectedLoraModel": [],
                                        "selectedLoraModelPrivateUrl": "", "selectedControlnetModel": []},
    "Adel_AI/Comics-Factory-v1": {},
    "wiro/text-to-image-sd-lora": {"selectedModel": "", "selectedModelPrivate": "", "selectedLoraModel": [],
                                   "selectedLoraModelPrivateUrl": ""},
    "wiro/text-to-image-flux-lora-fast": {"selectedLoraModel": [], "selectedLoraModelPrivateUrl": ""},
}


def run_needs(spec: ToolSpec, raw: dict[str, Any], catalog: ModelCatalog) -> list[str]:
    """The catalog ids a Run of ``spec`` with the request fields ``raw`` loads, in load order.

    Raises:
        easel.catalog.InputError: ``raw`` does not validate.
    """
    # required non-model inputs (a photo, a prompt) select no weights: any value lets the request validate
    filler = {i.name: "x" for i in spec.inputs if i.required and i.type not in ("select", "multiselect")}
    inputs = spec.validate({**filler, **raw}, catalog)
    ids: list[str] = []
    for i in spec.inputs:
        if i.type in ("select", "multiselect"):
            chosen = inputs[i.name] if i.type == "multiselect" else [inputs[i.name]]
            ids += [str(m) for m in chosen if str(m) in catalog.entries]
    ids += [str(m) for m in (spec.base_model, *spec.preset.values()) if isinstance(m, str) and m in catalog.entries]
    from easel.tools.registry import tools

    registered = tools().get(spec.name)
    declaration = registered.declaration if registered else None
    ids += list(declaration.fixed if declaration else ())
    estimators = dict(declaration.estimators if declaration else ())
    for mid in list(ids):
        condition = catalog.entries[mid].condition if mid in catalog.entries else ""
        if condition in estimators:
            ids.append(estimators[condition])
    return list(dict.fromkeys(ids))
