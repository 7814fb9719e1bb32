"""One tool input (:class:`InputSpec`) and the coercion of raw request values into typed inputs.

Raw values are already parsed from JSON, multipart or form bodies by ``easel.api``; each helper
raises :class:`~easel.catalog.errors.InputError` naming the field and what it accepts, with Wiro's
documented message wording.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from easel import strict

from .errors import InputError
from .models import LORA_KINDS, ModelCatalog


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


def no_stand_in_lora(spec: InputSpec, raw: Any, value: Any, catalog: ModelCatalog) -> Any:
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


def coerce(spec: InputSpec, value: Any) -> Any:
    """One raw request value → the typed value of ``spec`` (``number`` → int, ``float`` → float,
    ``select`` → id string, ``multiselect`` → list of distinct id strings, text → str); an empty
    value takes the spec's default.

    Raises:
        InputError: a required input left empty, a value of the wrong type, a number outside
            ``[min, max]`` or not a multiple of ``multiple_of``, an option id not offered.
    """
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


def scale(setting: dict, value: Any) -> float:
    """A LoRA scale (a catalog entry's ``generatesettings`` item) from the request's value, else the
    setting's default; a float within ``[minvalue, maxvalue]``.

    Raises:
        InputError: not a number, or out of range.
    """
    sid = setting["id"]
    lo, hi = float(setting.get("minvalue", "-inf")), float(setting.get("maxvalue", "inf"))
    if _missing(value):
        value = setting.get("value", setting.get("defaultvalue"))
    num = _number(sid, value, integer=False)
    if not lo <= num <= hi:
        raise InputError(sid, f"Request parameter [{sid}] must be between {_fmt(lo)} and {_fmt(hi)}")
    return num
