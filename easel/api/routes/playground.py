"""The browser playground (``/playground``) and the server's front page (``/``).

The playground is plain HTML/CSS/JS shipped in the package (``easel/api/static/playground/``):
no build step, nothing loaded from a CDN, no library. The page is a client of the public Wiro
API like any other: the user pastes an API key (and secret, for signature projects); the page
signs each request itself with WebCrypto (``x-nonce`` + ``x-signature`` as ``easel.signing``
defines them) and keeps the credentials in the tab's ``sessionStorage`` only. The server stores
nothing for it and serves the same page for ``/playground`` and ``/playground/{owner}/{slug}``
(the page reads the tool from its path), with ``settings.api.ws_path`` written into it.

The pages are sent with a strict Content-Security-Policy (scripts and styles from this origin
only, no inline script) so that text from tool descriptions or task parameters can never run.
"""
from __future__ import annotations

import html
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from easel.config import Settings

STATIC = Path(__file__).parent.parent / "static" / "playground"

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self' ws: wss:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}

FRONT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Easel</title><link rel="stylesheet" href="/playground/static/playground.css"></head>
<body><main class="front"><h1>Easel</h1>
<p>A self-hostable image-generation server that speaks the Wiro tool API.</p>
<ul>
<li><a href="/playground">Playground</a>: try every tool in the browser with your API key.</li>
<li><a href="/docs">API reference</a> (OpenAPI, every tool's inputs).</li>
<li><a href="/metrics">Metrics</a> (Prometheus text format).</li>
</ul></main></body></html>
"""


def router(settings: Settings) -> APIRouter:
    """``/``, ``/playground``, ``/playground/{owner}/{slug}`` and ``/playground/static/*``, with
    ``settings.api.ws_path`` written into the page (none of them in the OpenAPI document)."""
    page = (STATIC / "index.html").read_text(encoding="utf-8").replace(
        "{{WS_PATH}}", html.escape(settings.api.ws_path, quote=True))
    routes = APIRouter()
    # mounted first: /playground/static/x.js must not match /playground/{owner}/{slug}
    routes.mount("/playground/static", StaticFiles(directory=STATIC), name="playground-static")

    @routes.get("/", include_in_schema=False)
    async def front():
        return HTMLResponse(FRONT, headers=HEADERS)

    @routes.get("/playground", include_in_schema=False)
    async def playground():
        return HTMLResponse(page, headers=HEADERS)

    @routes.get("/playground/{owner}/{slug}", include_in_schema=False)
    async def playground_tool(owner: str, slug: str):
        return HTMLResponse(page, headers=HEADERS)

    return routes
