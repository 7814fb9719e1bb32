"""Tools as the API describes them: Wiro's Tool/List and Tool/Detail items, and a JSON Schema of
each tool's Run inputs for the OpenAPI document.

Wiro's parameter format (``markdown/models.md`` of the Wiro docs): ``parameters`` is a list of
groups ``{"title", "subtitle", "items": [...]}``, each item ``{"id", "type", "required",
"advanced", ...}``. Easel adds to each item what a client needs to build a form or validate
offline: ``label``, ``help``, ``default``, ``options`` (catalog ids with their labels, trigger
words and per-model scale settings), ``min``/``max``/``multiple_of``.
"""
from __future__ import annotations

import json
from typing import Any

from easel.catalog import InputSpec, ModelCatalog, ToolSpec

REQUIRED = {"prompt"}


def _option(opt: dict, catalog: ModelCatalog) -> dict:
    mid = str(opt.get("model", opt.get("value", "")))
    entry = catalog.entries.get(mid)
    if entry is None:
        return {"value": mid, "label": opt.get("label", mid)}
    return {"value": mid, "label": entry.label, "kind": entry.kind, "description": entry.description,
            "triggerwords": list(entry.triggerwords), "generatesettings": list(entry.generatesettings)}


def parameter_item(spec: InputSpec, catalog: ModelCatalog) -> dict:
    """One input in Wiro's ``parameters[].items[]`` shape plus Easel's form details."""
    item: dict[str, Any] = {"id": spec.name, "type": spec.type, "required": spec.name in REQUIRED,
                            "advanced": spec.name not in REQUIRED, "label": spec.label, "help": spec.help,
                            "default": spec.default}
    if spec.options:
        item["options"] = [_option(o, catalog) for o in spec.options]
    for key in ("min", "max", "multiple_of"):
        if getattr(spec, key) is not None:
            item[key] = getattr(spec, key)
    return item


def tool_summary(index: int, spec: ToolSpec) -> dict:
    """A Tool/List item."""
    return {
        "id": str(index), "title": spec.slug.replace("-", " "), "slugowner": spec.owner, "slugproject": spec.slug,
        "cleanslugowner": spec.owner.lower(), "cleanslugproject": spec.slug.lower(), "description": spec.description,
        "image": spec.cover, "categories": list(spec.categories), "tags": list(spec.tags), "marketplace": 1,
        "onlymembers": "0", "available": spec.module is not None,
        "dynamicprice": json.dumps([{"inputs": {}, "price": spec.cost_per_second, "priceMethod": "cps"}]),
    }


def tool_detail(index: int, spec: ToolSpec, catalog: ModelCatalog) -> dict:
    """A Tool/Detail item: the summary plus ``readme`` and ``parameters``."""
    out = tool_summary(index, spec)
    out["readme"] = spec.description
    out["dynamicprice"] = json.loads(out["dynamicprice"])
    out["parameters"] = [{"title": "", "subtitle": "", "items": [parameter_item(i, catalog) for i in spec.inputs]}]
    return out


def matches(spec: ToolSpec, search: str = "", categories: list[str] | None = None, tags: list[str] | None = None,
            slugowner: str = "") -> bool:
    """Tool/List filter: ``search`` is a case-insensitive substring of owner, slug or description;
    every listed category (and tag) must be one of the tool's; ``slugowner`` matches exactly."""
    if search:
        hay = f"{spec.owner} {spec.slug} {spec.slug.replace('-', ' ')} {spec.description}".lower()
        if search.lower().strip() not in hay:
            return False
    if categories and not set(categories) <= set(spec.categories):
        return False
    if tags and not set(tags) <= set(spec.tags):
        return False
    return not slugowner or slugowner.lower() == spec.owner.lower()


def input_schema(spec: ToolSpec, catalog: ModelCatalog) -> dict:
    """JSON Schema of a tool's Run body (types, defaults, allowed values, bounds).

    Numbers also accept numeric strings (Wiro clients send ``"scale": "7.5"``); ``multiselect``
    accepts a list of ids or one comma-separated string.
    """
    props: dict[str, Any] = {}
    for i in spec.inputs:
        desc = i.help if i.help and not i.help.endswith("-help") else i.label
        if i.type in ("text", "textarea"):
            p: dict[str, Any] = {"type": "string"}
        elif i.type in ("number", "float"):
            p = {"type": "integer" if i.type == "number" else "number"}
            if i.min is not None:
                p["minimum"] = i.min
            if i.max is not None:
                p["maximum"] = i.max
            if i.multiple_of:
                p["multipleOf"] = i.multiple_of
            p = {"anyOf": [p, {"type": "string", "pattern": r"^-?[0-9.]+$"}]}
        else:
            ids = [str(o.get("model", o.get("value"))) for o in i.options]
            labels = [f"{opt['value']} = {opt['label']}" for opt in (_option(o, catalog) for o in i.options)]
            one = {"type": "string", "enum": list(dict.fromkeys(ids + [str(v) for v in str(i.default).split(",") if v]))}
            if i.type == "multiselect":
                p = {"anyOf": [{"type": "array", "items": one}, {"type": "string", "description": "comma-separated ids"}]}
            else:
                p = one
            if labels:
                desc = f"{desc}. Options: " + "; ".join(labels)
        p["default"] = i.default
        if desc:
            p["description"] = desc
        props[i.name] = p
    for i in spec.inputs:  # per-model scales (e.g. a LoRA's weight) are request fields too
        if i.type not in ("select", "multiselect"):
            continue
        ids = [str(o.get("model", "")) for o in i.options] + [v.strip() for v in str(i.default).split(",")]
        for mid in dict.fromkeys(ids):
            entry = catalog.entries.get(mid)
            for gs in entry.generatesettings if entry else ():
                props.setdefault(gs["id"], {"type": "number", "minimum": float(gs.get("minvalue", 0)),
                                            "maximum": float(gs.get("maxvalue", 1)),
                                            "default": float(gs.get("value", gs.get("defaultvalue", 1))),
                                            "description": f"{gs.get('label', gs['id'])} (when {entry.label} is selected)"})
    props["callbackUrl"] = {"type": "string", "format": "uri",
                            "description": "POSTed the task object (signed, Standard Webhooks headers) when it ends"}
    return {"type": "object", "title": f"{spec.owner}/{spec.slug} inputs", "properties": props}
