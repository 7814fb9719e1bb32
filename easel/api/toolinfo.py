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
import re
from typing import Any, Mapping

from easel.catalog import InputSpec, ModelCatalog, ToolSpec

REQUIRED = {"prompt"}
_UNCLEAN = re.compile(r"[^a-z0-9_.-]+")


def clean_slug(name: str) -> str:
    """Wiro's clean form of an owner or project slug: lower case, runs of other characters as one
    ``-`` (``Adel_AI`` → ``adel_ai``, ``Virtual Try-On`` → ``virtual-try-on``)."""
    return _UNCLEAN.sub("-", name.strip().lower()).strip("-")


def find_tool(tools: Mapping[str, ToolSpec], owner: str, slug: str) -> ToolSpec | None:
    """The tool named ``owner/slug`` in any case, by its canonical or its clean slugs; None if unknown."""
    exact = tools.get(f"{owner}/{slug}")
    if exact is not None:
        return exact
    want = (clean_slug(owner), clean_slug(slug))
    for spec in tools.values():
        if (clean_slug(spec.owner), clean_slug(spec.slug)) == want:
            return spec
    return None


def tool_id(tools: Mapping[str, ToolSpec], spec: ToolSpec) -> str:
    """The tool's numeric id as a string (its 1-based place in the catalog; Wiro's ``modelid``)."""
    return str(list(tools).index(spec.name) + 1)


def compact_json(value: Any) -> str:
    """JSON without spaces, as Wiro's string-encoded fields (``dynamicprice``, ``categories``) are."""
    return json.dumps(value, separators=(",", ":"))


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


def taskstat(stats: tuple | None) -> dict:
    """Wiro's ``taskstat``: ``runcount`` a number, the others strings (as models.md shows)."""
    runs, ok, failed, last = (stats or (0, 0, 0, 0.0))[:4]
    return {"runcount": runs, "successcount": str(ok), "errorcount": str(failed), "lastruntime": str(int(last))}


def tool_summary(tool_id_: str, spec: ToolSpec, stats: tuple | None = None) -> dict:
    """A Tool/List item, with the fields and value types of Wiro's models.md. Beyond Wiro:
    ``available`` (false while the tool's module has not landed on this server)."""
    seconds = (stats or (0, 0, 0, 0.0, 0.0))[4:5] or (0.0,)
    return {
        "id": tool_id_, "title": spec.slug.replace("-", " "), "slugowner": spec.owner, "slugproject": spec.slug,
        "cleanslugowner": clean_slug(spec.owner), "cleanslugproject": clean_slug(spec.slug),
        "description": spec.description, "image": spec.cover,
        "computingtime": f"{max(1, round(seconds[0]))} seconds" if seconds[0] else "",
        "categories": list(spec.categories), "tags": list(spec.tags), "marketplace": 1,
        "onlymembers": "0", "averagepoint": "0.00", "commentcount": "0",
        "dynamicprice": compact_json([{"inputs": {}, "price": spec.cost_per_second, "priceMethod": "cps"}]),
        "taskstat": taskstat(stats), "available": spec.module is not None,
    }


def tool_detail(tool_id_: str, spec: ToolSpec, catalog: ModelCatalog, stats: tuple | None = None) -> dict:
    """A Tool/Detail item: the summary plus ``readme``, ``parameters`` (Wiro's groups),
    ``inspire``, ``samples``, ``ratedusercount``, ``seotitle`` and ``seodescription``."""
    out = tool_summary(tool_id_, spec, stats)
    out.update({
        "readme": spec.description,
        "parameters": [{"title": "", "subtitle": "", "items": [parameter_item(i, catalog) for i in spec.inputs]}],
        "inspire": [], "samples": [], "ratedusercount": "0",
        "seotitle": f"{spec.owner}/{spec.slug}", "seodescription": spec.description,
    })
    return out


def explore(tools: Mapping[str, ToolSpec], stats: Mapping[str, tuple] | None = None) -> list[dict]:
    """Tool/Explore's ``explore`` list: the tools that run on this server, grouped by task
    category (``text-to-image``, ``image-to-image``, ...), as the Wiro MCP and WiroKit read it:
    ``[{"id", "title", "total", "tools": [{"id", "cleanslugowner", "cleanslugproject", "image",
    "description", "categories", "commentcount", "ratedusercount", "averagepoint", ...}]}]``."""
    groups: dict[str, list[dict]] = {}
    for spec in tools.values():
        if not spec.module:
            continue
        kinds = [c for c in spec.categories if "-to-" in c] or ["other"]
        item = tool_summary(tool_id(tools, spec), spec, (stats or {}).get(spec.name))
        item.update({"ratedusercount": "0", "discount": None})
        groups.setdefault(kinds[0], []).append(item)
    return [{"id": kind, "title": kind.replace("-", " ").capitalize(), "total": len(items), "tools": items}
            for kind, items in groups.items()]


def matches(spec: ToolSpec, search: str = "", categories: list[str] | None = None, tags: list[str] | None = None,
            slugowner: str = "") -> bool:
    """Tool/List filter: ``search`` is a case-insensitive substring of owner, slug or description;
    every listed category (and tag) must be one of the tool's; ``slugowner`` matches in any case or clean form."""
    if search:
        hay = f"{spec.owner} {spec.slug} {spec.slug.replace('-', ' ')} {spec.description}".lower()
        if search.lower().strip() not in hay:
            return False
    if categories and not set(categories) <= set(spec.categories):
        return False
    if tags and not set(tags) <= set(spec.tags):
        return False
    return not slugowner or clean_slug(slugowner) == clean_slug(spec.owner)


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
