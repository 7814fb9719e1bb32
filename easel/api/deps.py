"""FastAPI dependencies of the routes: :func:`services` (the app's :class:`~.services.Services`)
and, for every Wiro endpoint, :func:`wiro` (:class:`WiroCall`: the services, the authenticated and
rate-limited project, and the body parsed with Wiro's quirks, :func:`easel.api.parsing.parse_body`);
plus :func:`respond` and :func:`call`.

A Wiro route declares ``call: WiroCall = Depends(wiro)``: one dependency rather than one each for
the project and the body, because FastAPI's bookkeeping costs about 30 µs of CPU per dependency
and request (the Wiro endpoints are the hot path). The key is checked before the body is read.
No dependency declares a query, header or body parameter, so the OpenAPI document is unchanged by
them (the request bodies are described by :mod:`easel.api.openapi_doc`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, TypeVar

import orjson
from fastapi import Request
from fastapi.responses import Response

from easel.store import Project

from .auth import authenticate, authenticate_without_io
from .errors import WiroError
from .parsing import Body, parse_body
from .services import Services

T = TypeVar("T")


async def services(request: Request) -> Services:
    """Dependency: the app's services (``app.state.services``). Async: FastAPI would run a plain
    function dependency in a worker thread."""
    return request.app.state.services


def rate_limited(svc: Services, request: Request, project: Project | None = None) -> Project:
    """The calling project (``project``: already authenticated by :func:`authenticate_without_io`,
    else authenticated here, which may read the store), after the rate limit.

    Raises:
        WiroError: 401 (unknown key, bad signature or nonce), 429 with ``Retry-After`` (the
            project's requests per minute are used up).
    """
    project = project or authenticate(request.headers, svc.store, svc.settings, svc.projects, svc.clock)
    wait = svc.limiter.check(f"project-{project.id}")  # the key's project: no secret in Redis
    if wait is not None:
        seconds = max(1, math.ceil(wait))
        raise WiroError(0, f"Too many requests: this API key may make {svc.settings.api.rate_limit_per_minute} "
                           f"requests per minute. Retry after {seconds} s.", 429, {"Retry-After": str(seconds)})
    return project


async def project(svc: Services, request: Request) -> Project:
    """The calling project. On the event loop when that needs no I/O (a cached lenient or API-key
    project, a rate limit in this process's memory), else in a thread (store read, strict nonce
    write, the limit's window in Redis). Raises :class:`WiroError` (401, 429)."""
    found = None if svc.auth_needs_io else authenticate_without_io(request.headers, svc.settings, svc.projects)
    if found is not None:
        return rate_limited(svc, request, found)
    return await svc.in_thread(rate_limited, svc, request)


async def body(svc: Services, request: Request) -> Body:
    """The request's fields and files, parsed as Wiro's clients send them (JSON, multipart, form,
    or a JSON text in a form field), within the settings' size caps. Raises :class:`WiroError`
    naming what is wrong (400/413)."""
    settings = svc.settings
    return await parse_body(request, settings.fetch.upload_max_bytes, settings.api.request_max_bytes, settings.api.body_max_bytes)


@dataclass(frozen=True, slots=True)
class WiroCall:
    """What a Wiro endpoint is given (:func:`wiro`)."""

    svc: Services
    project: Project
    body: Body


async def wiro(request: Request) -> WiroCall:
    """Dependency of the Wiro endpoints: the app's services, the calling :func:`project` (a bad
    key or an exhausted rate limit is refused before the body is read), then the :func:`body`."""
    svc: Services = request.app.state.services
    who = await project(svc, request)
    return WiroCall(svc, who, await body(svc, request))


async def call(svc: Services, fn: Callable[..., T], *args, reads: bool = False) -> T:
    """``fn(*args)`` in a request thread (one hop per request), or, with ``reads`` (``fn`` makes
    only bounded indexed reads) on SQLite, on the event loop: a WAL reader never waits for a lock,
    and the hop (~0.07-0.1 ms of CPU and a GIL hand-over) would cost more than the reads."""
    if reads and svc.store.sqlite:
        return fn(*args)
    return await svc.in_thread(fn, *args)


def respond(answer) -> Response:
    """A JSON answer serialised by orjson (no ``jsonable_encoder`` pass: answers are plain dicts
    of JSON types already); a :class:`Response` passes through."""
    if isinstance(answer, Response):
        return answer
    return Response(orjson.dumps(answer), media_type="application/json")
