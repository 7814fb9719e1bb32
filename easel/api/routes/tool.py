"""Wiro's Tool endpoints: ``POST /v1/Tool/List``, ``Detail`` and ``Explore`` (the tools on this
server, in Wiro's shapes, with run counts and average times from the store)."""
from __future__ import annotations

from fastapi import APIRouter, Depends

from easel.tasks import lifecycle as lc

from .. import deps, toolinfo
from .. import errors as E
from ..deps import WiroCall
from ..errors import WiroError
from ..services import Services
from .task import int_field

router = APIRouter()


@router.post("/v1/Tool/List", summary="Tools on this server (start, limit, search, categories, tags, slugowner)")
async def tool_list(wiro: WiroCall = Depends(deps.wiro)):
    svc, body = wiro.svc, wiro.body
    return deps.respond(await deps.call(svc, list_tools, svc, body.fields))


@router.post("/v1/Tool/Detail", summary="One tool with its inputs in Wiro's parameter format")
async def tool_detail(wiro: WiroCall = Depends(deps.wiro)):
    svc, body = wiro.svc, wiro.body
    return deps.respond(await deps.call(svc, detail_of, svc, body.fields))


@router.post("/v1/Tool/Explore", summary="Runnable tools grouped by category (Wiro MCP's explore)")
async def tool_explore(wiro: WiroCall = Depends(deps.wiro)):
    svc = wiro.svc
    return deps.respond(await deps.call(svc, explore, svc))


def list_tools(svc: Services, fields: dict) -> dict:
    """Tool/List: ``start``, ``limit`` (1-1000, default 20), ``search``, ``categories``, ``tags``,
    ``slugowner``, ``order`` (``DESC`` reverses). Raises :class:`WiroError` for a non-integer page field."""
    start, limit = int_field(fields, "start", 0, 0, 10**9), int_field(fields, "limit", 20, 1, 1000)
    cats, tags = _list_field(fields, "categories"), _list_field(fields, "tags")
    found = [spec for spec in svc.tools.values()
             if toolinfo.matches(spec, str(fields.get("search", "") or ""), cats, tags,
                                 str(fields.get("slugowner", "") or ""))]
    if str(fields.get("order", "")).upper() == "DESC":
        found.reverse()
    stats = svc.store.tool_stats(lc.POSTPROCESS_END)
    return {"result": True, "errors": [], "total": len(found),
            "tool": [toolinfo.tool_summary(toolinfo.tool_id(svc.tools, spec), spec, stats.get(spec.name))
                     for spec in found[start:start + limit]]}


def detail_of(svc: Services, fields: dict) -> dict:
    """Tool/Detail of ``slugowner``/``slugproject``. Raises :class:`WiroError` (code 1) for an unknown tool."""
    owner, slug = str(fields.get("slugowner", "") or ""), str(fields.get("slugproject", "") or "")
    spec = toolinfo.find_tool(svc.tools, owner, slug)
    if spec is None:
        raise WiroError(1, E.TOOL_NOT_FOUND)
    stats = svc.store.tool_stats(lc.POSTPROCESS_END).get(spec.name)
    return {"result": True, "errors": [],
            "tool": [toolinfo.tool_detail(toolinfo.tool_id(svc.tools, spec), spec, svc.catalog, stats)]}


def explore(svc: Services) -> dict:
    """Tool/Explore: the runnable tools grouped by category (the Wiro MCP's and WiroKit's ``explore``)."""
    return {"result": True, "errors": [], "explore": toolinfo.explore(svc.tools, svc.store.tool_stats(lc.POSTPROCESS_END))}


def _list_field(fields: dict, name: str) -> list[str]:
    value = fields.get(name)
    if value in (None, "", []):
        return []
    if isinstance(value, list):
        return [str(v) for v in value if str(v)]
    return [v.strip() for v in str(value).split(",") if v.strip()]
