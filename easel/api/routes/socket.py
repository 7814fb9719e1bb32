"""The live WebSocket (Wiro's ``websocket.md``) at ``Settings.api.ws_path`` (``/v1``): one frame per
stored task event, as :func:`easel.api.live.serve_socket` sends them. The path is a setting, so
the router is built for it (:func:`router`)."""
from __future__ import annotations

from functools import partial

from fastapi import APIRouter, WebSocket

from .. import live, views
from ..services import Services


def router(ws_path: str) -> APIRouter:
    """A router with the socket at ``ws_path`` (a path starting with ``/``)."""
    routes = APIRouter()

    @routes.websocket(ws_path)
    async def socket(ws: WebSocket):
        svc: Services = ws.app.state.services
        settings = svc.settings
        await live.serve_socket(ws, svc.store, partial(views.output_list, svc), poll=settings.live.live_poll_interval,
                                hub=svc.wakeups, fallback=settings.live.live_fallback_poll_interval)

    return routes
