"""Which catalog ids a Run needs: the checkpoint, LoRAs and ControlNets it selects, the tool's
fixed models (``base_model``, ``preset``) and the components its pipeline always loads and the
condition estimators its ControlNets need (both declared by the tool,
``easel.tools.base.ToolDeclaration``). Used by
``easel models pull --tool/--seeds`` to fetch ahead of time exactly what those Runs load."""
from __future__ import annotations

from typing import Any

from easel.catalog import ModelCatalog, ToolSpec




def seed_request(spec: ToolSpec) -> dict[str, Any]:
    """The model fields of a seed page's own example request (``../shared/seeds``, "Run
    Command"): every input that selects catalog models, sent empty (the server's defaults, and
    no LoRA nobody chose); every other field of those requests selects no weights."""
    return {i.name: [] if i.type == "multiselect" else "" for i in spec.inputs
            if i.type in ("select", "multiselect") and all("model" in o for o in i.options)}


def seed_requests() -> dict[str, dict[str, Any]]:
    """:func:`seed_request` of every seed page: the implemented tools whose catalog file Easel
    ships (``easel/catalog/tools``; a plug-in's tool is no seed page)."""
    from easel.catalog import HERE, load_tools
    from easel.tools.registry import tools

    ours = (HERE / "tools").resolve()
    return {name: seed_request(spec) for name, spec in load_tools().items()
            if name in tools() and tools()[name].declaration.catalog.resolve().parent == ours}


def __getattr__(name: str) -> dict[str, dict[str, Any]]:
    """``SEED_REQUESTS``: :func:`seed_requests`, computed when asked."""
    if name == "SEED_REQUESTS":
        return seed_requests()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
