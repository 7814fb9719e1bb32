"""A tool's catalog file as Easel reads it (:class:`ToolSpec`), its request validation, and
:func:`load_tools` (the catalog files of the registered tools and of the built-in catalog)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .errors import InputError
from .examples import Example
from .inputs import InputSpec, coerce, no_stand_in_lora, scale
from .models import CHECKPOINT_KINDS, HERE, ModelCatalog

_INVALID = "Request parameters are invalid."  # Wiro's documented text (easel.api.errors.INVALID_BODY)


@dataclass
class ToolSpec:
    """A tool: identity, categories, cost, implementing module and its inputs.

    ``base_model`` is the catalog id of the checkpoint a tool without a model selector runs
    (FLUX tools); ``preset`` fixes inputs a "model" page does not expose, e.g. Comics Factory's
    ``{"lora": "<catalog id>", "scale": 1.0}``. ``family`` (one of :func:`families`) is the one
    the tool's module declares (``easel.tools.base.ToolDeclaration``); "" for a catalog file no
    registered tool implements (then :meth:`model_family` asks the chosen checkpoint).
    ``openai`` is how the OpenAI-compatible Images API maps onto the tool (:mod:`easel.api.openai_map`).
    """

    owner: str
    slug: str
    module: str | None
    description: str
    categories: list[str]
    inputs: list[InputSpec]
    cost_per_second: float
    cover: str = ""
    tags: list[str] = field(default_factory=list)
    base_model: str | None = None
    preset: dict = field(default_factory=dict)
    family: str = ""
    openai: dict = field(default_factory=dict)
    example: Example | None = None  # the seed's own request and its input files (easel.catalog.examples)

    @property
    def name(self) -> str:
        return f"{self.owner}/{self.slug}"

    def model_family(self, inputs: dict[str, Any], catalog: "ModelCatalog") -> str:
        """The model family (one of :func:`families`) whose warm pipelines run a task of this tool.

        The family the tool declares when set; else the family of the
        checkpoint the task runs: the tool's ``base_model`` (FLUX tools), or the checkpoint chosen
        in the first ``select`` input whose value (``inputs``, as :meth:`validate` returns them)
        is a catalog checkpoint (the SD tool's ``selectedModel``). ``sd15`` when none is found.
        """
        if self.family:
            return self.family
        chosen = [self.base_model] if self.base_model else []
        chosen += [str(inputs.get(i.name, "")) for i in self.inputs if i.type == "select"]
        for mid in chosen:
            entry = catalog.entries.get(str(mid))
            if entry is not None and entry.kind in CHECKPOINT_KINDS:
                return entry.family
        return "sd15"

    def input(self, name: str) -> InputSpec:
        for i in self.inputs:
            if i.name == name:
                return i
        raise KeyError(name)

    def check_lengths(self, raw: dict[str, Any]) -> None:
        """Refuse a Run body with a field over its length cap (:mod:`easel.catalog.limits`).

        Raises:
            InputError: naming the field, its cap and the length sent.
        """
        from . import limits

        over = limits.over_cap({i.name: i.type for i in self.inputs}, raw)
        if over is None:
            return
        name, cap, got = over
        if name == "body":
            raise InputError(name, f"{_INVALID} The request has {got} fields; a Run takes at most {cap}.")
        if name == "name":
            raise InputError(name, f"{_INVALID} A field name is {got} characters long; at most {cap} are accepted.")
        raise InputError(name, f"Request parameter [{name}] is too long: at most {cap} characters (got {got})")

    def validate(self, raw: dict[str, Any], catalog: ModelCatalog) -> dict[str, Any]:
        """Coerce and check raw request values against this tool's inputs.

        Args:
            raw: Field name → value as the client sent it (str, int, float, list, or ``None``).
                Unknown names are ignored.
            catalog: Used to resolve option ids and their per-model ``generatesettings``.

        Returns:
            Every input name → typed value (``number`` → int, ``float`` → float, ``multiselect``
            → list of id strings, others → str), plus, for every selected catalog model with
            ``generatesettings``, the setting id → float scale (the request's value or the
            catalog default).

        Raises:
            InputError: naming the first offending field and what it accepts, or a combination of
                inputs the tool cannot run (:mod:`easel.catalog.rules`).
        """
        out: dict[str, Any] = {}
        for spec in self.inputs:
            out[spec.name] = coerce(spec, raw.get(spec.name))
            if spec.type in ("select", "multiselect"):
                out[spec.name] = no_stand_in_lora(spec, raw.get(spec.name), out[spec.name], catalog)
        for spec in self.inputs:
            if spec.type not in ("select", "multiselect"):
                continue
            chosen = out[spec.name] if spec.type == "multiselect" else [out[spec.name]]
            for mid in chosen:
                if not mid or mid not in catalog.entries:
                    continue
                for gs in catalog.get(mid).generatesettings:
                    out[gs["id"]] = scale(gs, raw.get(gs["id"]))
        from .rules import check

        check(self.name, out)  # combinations of inputs that cannot run (easel.catalog.rules)
        return out


@lru_cache(maxsize=1)
def load_tools() -> dict[str, ToolSpec]:
    """All tool specs, keyed ``owner/slug``: the catalog files of the registered tools (found
    through the ``easel.tools`` entry points, :mod:`easel.tools.registry`, wherever their package
    keeps them), and those under ``tools/`` here that no installed module implements (``module``
    None: listed, not runnable).

    Raises:
        easel.tools.registry.RegistryError: a tool plug-in that breaks the contract.
    """
    from easel.tools.registry import tools as registered

    found = {tool.declaration.catalog.resolve(): tool for tool in registered().values()}
    paths = sorted((HERE / "tools").glob("*.json"))
    paths += sorted(p for p in found if p not in {q.resolve() for q in paths})
    tools = {}
    for path in paths:
        t = json.loads(path.read_text())
        tool = found.get(path.resolve())
        inputs = [
            InputSpec(
                name=i["name"], type=i["type"], label=i.get("label", ""), help=i.get("help", ""),
                default=i.get("default", ""), options=i.get("options", []), min=i.get("min"),
                max=i.get("max"), multiple_of=i.get("multiple_of"), note=i.get("note", ""),
                required=bool(i.get("required", False)), accepts=i.get("accepts", ""),
            )
            for i in t["inputs"]
        ]
        spec = ToolSpec(
            owner=t["owner"], slug=t["slug"], module=tool.module.__name__ if tool else None,
            description=t.get("description", ""),
            categories=t.get("categories", []), inputs=inputs, cost_per_second=float(t.get("cost_per_second", 0)),
            cover=t.get("cover", ""), tags=t.get("tags", []), base_model=t.get("base_model"),
            preset=t.get("preset", {}), family=tool.declaration.family.name if tool else "",
            openai=t.get("openai", {}),
            example=Example.from_json(t.get("example"), path.parent),
        )
        tools[spec.name] = spec
    return tools
