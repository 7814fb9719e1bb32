"""The FastAPI application: Wiro's Run, Task, Tool and File endpoints, the live WebSocket, the
OpenAI-compatible images API, the playground, metrics and health, one router per resource
(:mod:`easel.api.routes`), all given one :class:`~.services.Services` on ``app.state.services``.

Beyond Wiro: ``Idempotency-Key`` and ``Prefer: wait=N`` on Run, ``Task/List``, a rate limit
(HTTP 429, :mod:`.ratelimit`) and an OpenAPI document with every tool's inputs (:mod:`.openapi_doc`).
"""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Callable

from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool

from easel.clock import SYSTEM, Clock
from easel.config import Settings
from easel.executors import Executor
from easel.malloc import freeze_startup_objects

from . import handlers, openapi_doc
from .metrics import HttpMetrics
from .routes import file, health, metrics, openai, playground, run, socket, task, tool
from .services import Services, new_threads

DESCRIPTION = ("Self-hostable image generation server speaking the Wiro tool API. Every endpoint answers Wiro's "
               "envelope `{result, errors: [{code, message}]}`; request errors are HTTP 200 with `result: false`, "
               "as Wiro's docs state.")


def create_app(settings: Settings, executor: Executor | None = None, dispatch_webhooks: bool = True,
               on_shutdown: Callable[[], None] | None = None, clock: Clock = SYSTEM) -> FastAPI:
    """Build the app. ``executor`` is told about new tasks; None leaves them queued in the store
    (workers of another process poll it). ``dispatch_webhooks`` runs the webhook sender thread.
    ``on_shutdown`` runs when the server shuts down (SIGTERM/SIGINT included), e.g. to stop workers.
    ``clock``: where authentication and the rate limit read the time (tests pass a ManualClock).

    Raises whatever opening the store or the storage raises (:meth:`Services.build`)."""
    svc = Services.build(settings, executor, clock)

    @asynccontextmanager
    async def lifespan(_app):
        # threads for store calls: as many as the store has connections for (see Services.build)
        import anyio.to_thread

        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api.api_threads
        if svc.threads._shutdown:  # the app is started again (e.g. an in-process test client)
            svc.threads = new_threads(settings)
        # what start-up built lives as long as the process: out of the collector's reach, so that
        # a full collection under load walks only the objects of requests (shorter pauses)
        freeze_startup_objects()
        if dispatch_webhooks:
            svc.webhooks.start()
        svc.maintenance.start()
        await svc.wakeups.start()
        try:
            yield
        finally:
            await svc.wakeups.stop()
            svc.maintenance.stop()
            svc.webhooks.stop()
            if on_shutdown is not None:
                await run_in_threadpool(on_shutdown)
            svc.threads.shutdown(wait=False)

    app = FastAPI(title="Easel", version="0.2.0", lifespan=lifespan, description=DESCRIPTION)
    app.state.services = svc
    app.state.api = svc  # the name before issue 22 (scripts that read app.state.api.store)
    if settings.api.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.api.cors_origins),
                           allow_methods=["GET", "HEAD", "POST", "OPTIONS"], allow_headers=["*"],
                           expose_headers=["Retry-After", "Preference-Applied"], max_age=600)
    app.add_middleware(HttpMetrics)
    handlers.install(app)
    # in this order (the first match wins, and the OpenAPI document lists paths in it)
    for router in (metrics.router, playground.router(settings), openai.router, run.router, task.router,
                   tool.router, socket.router(settings.api.ws_path), file.router, health.router):
        add_routes(app, router)
    app.openapi = openapi_doc.document(app, svc)
    return app


def add_routes(app: FastAPI, router: APIRouter) -> None:
    """Add ``router``'s routes to ``app`` as they are, as ``@app.post`` would have (no prefix, tags
    or dependencies of the router's own to apply). ``app.include_router`` would do the same, but
    FastAPI (0.16x) then matches every request through a lazy wrapper per included router: about
    300 more Python calls (~35 µs of CPU) per request on the Wiro hot path than a flat route list."""
    app.router.routes.extend(router.routes)

