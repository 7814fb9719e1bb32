"""The tool catalog (one JSON file per tool) and the global model catalog (ids shared by all tools).

Data lives beside this module: ``tools/<owner>__<slug>.json`` and ``models.json``. An operator
override file (``Settings.catalog_override``) is merged over ``models.json`` at start-up, so a
community model whose source is unknown can be pointed at its weights without editing the package.

Validation here turns raw request values (already parsed from JSON, multipart or form bodies by
``easel.api``) into typed tool inputs, raising :class:`InputError` that names the field and what
it accepts, with Wiro's documented message wording.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from easel import strict

from .examples import Example

HERE = Path(__file__).parent
_INVALID = "Request parameters are invalid."  # Wiro's documented text (easel.api.errors.INVALID_BODY)

CHECKPOINT_KINDS = ("sd15", "sdxl", "flux")
LORA_KINDS = ("sd15-lora", "sdxl-lora", "flux-lora")
# components: weights transformations (IC-Light offsets) and auxiliary networks (matting, ControlNets,
# InstantID's IP-Adapter, the face-analysis pack, condition estimators)
COMPONENT_KINDS = ("sd15-iclight", "matting", "sdxl-controlnet", "sdxl-ip-adapter", "face-analysis", "annotator")
KINDS = CHECKPOINT_KINDS + LORA_KINDS + COMPONENT_KINDS


def families() -> tuple[str, ...]:
    """The model families: what a worker keeps warm; a fleet has one queue per family
    (``easel.executors.celery``). Built from the registered tools' declarations
    (:func:`easel.tools.registry.families`; a tool whose pipeline is more than a checkpoint
    declares a family of its own), the default queue first."""
    from easel.tools.registry import families as declared

    return tuple(declared())


def __getattr__(name: str) -> tuple[str, ...]:
    """``FAMILIES``: :func:`families`, computed when first asked (the registry imports the tools)."""
    if name == "FAMILIES":
        return families()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class InputError(ValueError):
    """A request value that does not fit the tool's schema.

    Attributes:
        field: The request field name.
        message: Wiro-style message, e.g. ``Request parameter [steps] must be between 1 and 150``.
    """

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


class CatalogError(RuntimeError):
    """A catalog entry cannot be used as configured (e.g. its weights source is unknown)."""


@dataclass(frozen=True)
class ModelEntry:
    """One id of the global model catalog.

    ``source`` is ``None`` (unknown), ``{"type": "hf", "repo": ..., "weight_name"?: ...,
    "subfolder"?: ...}`` or ``{"type": "url", "url": "https://.../x.safetensors"}``.
    ``lora_format`` (LoRAs only) names the key layout the file uses, when known. ``tiny`` names
    the offline tiny model (``easel.synthetic.tiny``) that stands in for a component in tiny mode;
    ``condition`` (ControlNets) the condition image it reads: ``canny``, ``depth`` or ``openpose``.
    ``license``: ``{"id", "url"?, "noncommercial"?, "gated"?, "accept"?}``; with ``accept`` the
    weights are fetched only once the operator accepted that name (``Settings.accept_licenses``).
    Hub sources may also carry ``revision``, ``repo_type`` (``dataset``), ``files`` (exact repo
    paths), ``allow_patterns``, ``sha256`` and ``size`` (bytes); see docs/models.md.
    """

    id: str
    kind: str
    label: str
    description: str = ""
    triggerwords: tuple[str, ...] = ()
    generatesettings: tuple[dict, ...] = ()
    source: dict | None = None
    why: str = ""
    lora_format: str = ""
    tiny: str = ""
    condition: str = ""
    license: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        """``sd15``, ``sdxl`` or ``flux``."""
        return self.kind.split("-")[0]


class ModelCatalog:
    """Id → :class:`ModelEntry`, built from ``models.json`` plus an optional override file.

    The override file has the same shape: ``{"models": {"881": {"source": {...}}}}``; each listed
    id's fields replace the built-in ones (new ids may be added with all fields).
    """

    def __init__(self, entries: dict[str, ModelEntry], override_path: Path | None = None):
        self.entries = entries
        self.override_path = override_path

    @classmethod
    def load(cls, override_path: Path | None = None) -> "ModelCatalog":
        """Read the built-in catalog and merge ``override_path`` if it exists.

        Raises:
            CatalogError: the override file is not valid JSON or names an unknown kind.
        """
        data = json.loads((HERE / "models.json").read_text())["models"]
        if override_path is not None and Path(override_path).exists():
            try:
                extra = json.loads(Path(override_path).read_text()).get("models", {})
            except (ValueError, AttributeError) as exc:
                raise CatalogError(f"catalog override {override_path} is not valid JSON: {exc}") from exc
            for mid, fields_ in extra.items():
                data[str(mid)] = {**data.get(str(mid), {}), **fields_}
        entries = {}
        for mid, e in data.items():
            kind = e.get("kind")
            if kind not in KINDS:
                raise CatalogError(f"catalog id {mid}: kind {kind!r} is not one of {', '.join(KINDS)}")
            entries[mid] = ModelEntry(
                id=mid, kind=kind, label=e.get("label", mid), description=e.get("description", ""),
                triggerwords=tuple(e.get("triggerwords", ())),
                generatesettings=tuple(e.get("generatesettings", ())),
                source=e.get("source"), why=e.get("why", ""), lora_format=e.get("lora_format", ""),
                tiny=e.get("tiny", ""), condition=e.get("condition", ""), license=e.get("license") or {},
            )
        return cls(entries, override_path)

    def get(self, model_id: str) -> ModelEntry:
        """Return the entry; raises ``KeyError`` for an id the catalog does not have."""
        return self.entries[str(model_id)]

    def require_source(self, entry: ModelEntry) -> dict:
        """Return the entry's source, or raise :class:`CatalogError` telling the operator how to set it."""
        if entry.source:
            return entry.source
        where = self.override_path or "<data-dir>/catalog.override.json"
        raise CatalogError(
            f"Model {entry.id} ({entry.label}) has no weights source configured: its true source is not "
            f"public knowledge. The server operator can set it in {where}, e.g. "
            f'{{"models": {{"{entry.id}": {{"source": {{"type": "url", "url": "https://.../model.safetensors"}}}}}}}} '
            f'or {{"source": {{"type": "hf", "repo": "owner/name"}}}}, then restart the server; or run '
            f"`easel models set {entry.id} --hf OWNER/REPO[:FILE] | --url URL`."
        )


@dataclass
class InputSpec:
    """One tool input as the seed describes it, plus Easel's bounds for numbers."""

    name: str
    type: str
    label: str = ""
    help: str = ""
    default: Any = ""
    options: list[dict] = field(default_factory=list)
    min: float | None = None
    max: float | None = None
    multiple_of: int | None = None
    note: str = ""
    required: bool = False  # an empty value is refused at submission
    accepts: str = ""  # "image": a file input decoded as an image (URL, uploaded file name, multipart)

    def option_values(self) -> list[str]:
        return [str(o.get("model", o.get("value"))) for o in self.options]


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
            out[spec.name] = _coerce(spec, raw.get(spec.name))
            if spec.type in ("select", "multiselect"):
                out[spec.name] = _no_stand_in_lora(spec, raw.get(spec.name), out[spec.name], catalog)
        for spec in self.inputs:
            if spec.type not in ("select", "multiselect"):
                continue
            chosen = out[spec.name] if spec.type == "multiselect" else [out[spec.name]]
            for mid in chosen:
                if not mid or mid not in catalog.entries:
                    continue
                for gs in catalog.get(mid).generatesettings:
                    out[gs["id"]] = _scale(gs, raw.get(gs["id"]))
        from .rules import check

        check(self.name, out)  # combinations of inputs that cannot run (easel.catalog.rules)
        return out


def _no_stand_in_lora(spec: InputSpec, raw: Any, value: Any, catalog: "ModelCatalog") -> Any:
    """A LoRA input's value without the LoRAs nobody chose: an empty selection sent by the client
    (``[]``, ``""``) means no LoRA, not the seed's default; a default that names no listed option
    (e.g. InstantID's ``80``, the Flux tool's ``655``) is not applied either. Explicitly chosen
    ids and defaults that are listed options stay."""
    def lora(mid: str) -> bool:
        entry = catalog.entries.get(str(mid))
        return entry is not None and entry.kind in LORA_KINDS

    options = spec.option_values()
    if spec.type == "select":
        if value and lora(value) and _missing(raw) and (raw is not None or value not in options):
            return ""
        return value
    if raw is None:
        return [v for v in value if not lora(v) or v in options]
    return value


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "") or value == []


def _coerce(spec: InputSpec, value: Any) -> Any:
    name = spec.name
    if spec.type in ("text", "textarea"):
        if spec.required and _missing(value):
            what = ": an image URL, the name of a file uploaded with /v1/File/Upload, or a multipart file" \
                if spec.accepts == "image" else ""
            raise InputError(name, f"Request parameter [{name}] required{what}")
        if value is None:
            return "" if spec.default is None else str(spec.default)
        if isinstance(value, (list, dict)):
            raise InputError(name, f"Request parameter [{name}] must be a string")
        return str(value)
    if spec.type in ("number", "float"):
        if _missing(value):
            value = spec.default
        num = _number(name, value, integer=spec.type == "number")
        if (spec.min is not None and num < spec.min) or (spec.max is not None and num > spec.max):
            raise InputError(name, f"Request parameter [{name}] must be between {_fmt(spec.min)} and {_fmt(spec.max)}")
        if spec.multiple_of and num % spec.multiple_of:
            raise InputError(
                name, f"Request parameter [{name}] must be a multiple of {spec.multiple_of} "
                f"between {_fmt(spec.min)} and {_fmt(spec.max)} (got {_fmt(num)})")
        return num
    allowed = spec.option_values()
    default_values = [v for v in _split(spec.default)]
    if spec.type == "select":
        if isinstance(value, list):
            value = value[0] if len(value) == 1 else ("" if not value else value)
            if isinstance(value, list):
                raise InputError(name, f"Request parameter [{name}] takes one value, not a list")
        if _missing(value):
            return str(spec.default or "")
        value = _id_str(value)
        if value not in allowed and value not in default_values:
            raise InputError(name, f"Request parameter [{name}] must be one of: {_accepts(allowed, default_values)} (got {_show(value)})")
        return value
    if spec.type == "multiselect":
        if value is None:
            return default_values
        items = [_id_str(v) for v in _split(value)]
        for v in items:
            if v not in allowed and v not in default_values:
                raise InputError(name, f"Request parameter [{name}] values must be among: {_accepts(allowed, default_values)} (got {_show(v)})")
        return list(dict.fromkeys(items))
    raise InputError(name, f"Request parameter [{name}] has an unsupported type {spec.type!r}")


def _accepts(allowed: list[str], defaults: list[str]) -> str:
    values = list(dict.fromkeys(allowed + defaults))
    return ", ".join(values) if values else "(no values: leave it empty)"


def _id_str(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v).strip()


def _split(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return [_id_str(v) for v in value if not _missing(v)]
    return [p.strip() for p in str(value).split(",") if p.strip()]


def _number(name: str, value: Any, integer: bool) -> int | float:
    try:
        num = strict.parse_number(value, name)
    except strict.StrictError as exc:
        raise InputError(name, exc.message) from None
    if integer:
        if not num.is_integer():
            raise InputError(name, f"Request parameter [{name}] must be an integer (got {_show(value)})")
        return int(num)
    return num


def _show(value: Any) -> str:
    """``repr(value)``, shortened for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fmt(x: float | None) -> str:
    if x is None:
        return "any"
    return str(int(x)) if float(x).is_integer() else str(x)


def _scale(setting: dict, value: Any) -> float:
    sid = setting["id"]
    lo, hi = float(setting.get("minvalue", "-inf")), float(setting.get("maxvalue", "inf"))
    if _missing(value):
        value = setting.get("value", setting.get("defaultvalue"))
    num = _number(sid, value, integer=False)
    if not lo <= num <= hi:
        raise InputError(sid, f"Request parameter [{sid}] must be between {_fmt(lo)} and {_fmt(hi)}")
    return num


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
