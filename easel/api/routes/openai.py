"""An OpenAI-compatible Images API on Easel's tools and task engine (``docs/openai.md``).

``POST /v1/images/generations``, ``POST /v1/images/edits``, ``GET /v1/models`` and
``GET /v1/models/{id}``, answered in OpenAI's shapes so the official ``openai`` clients (Python,
Node) work unchanged. Each image request becomes an ordinary task through the Wiro Run path
(:func:`easel.api.routes.run.submit`: the same validation, limits, concurrency, idempotency,
retention), so it shows in Task/List, on the WebSocket, in webhooks, metrics and the playground
like a Wiro Run.

- Authentication: ``Authorization: Bearer <API key>`` of an API-key project (the rate limit
  applies as for Wiro requests); a signature project's key is refused with how to make an
  API-key project.
- Synchronous: the request holds until the task ends (no thread held while it waits), at most
  ``Settings.api.openai_wait_seconds`` (lowered per request by ``Prefer: wait=N``); past it, HTTP 504
  with the Wiro task id. A client that disconnects leaves its task running unless
  ``Settings.api.openai_kill_on_disconnect``.
- Streaming (``stream: true``): Server-Sent Events ``image_generation.partial_image`` (or
  ``image_edit.*``) from the task's step previews, up to ``partial_images``, then one
  ``*.completed`` event per image; a failure is an ``error`` event the clients raise.
- Errors: ``{"error": {"message", "type", "param", "code"}}`` (:class:`~.openai_map.OpenAIError`),
  the failing field named; a failed task is a 500 with its reason and id, a killed or cancelled
  one a 409, never a stack trace. Errors a retry cannot fix carry ``x-should-retry: false``.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from easel.storage import output_key
from easel.store import Project, Task
from easel.tasks import lifecycle as lc

from .. import deps, views
from ..errors import WiroError
from ..openai_map import OpenAIError, failure, find_model, map_request, model_object, openai_tools, param_of_message
from ..openai_map import MappedRequest as Mapped
from ..parsing import Body, Upload, parse_body, read_capped
from ..services import Services
from .run import prefer_wait, submit

log = logging.getLogger("easel.svc.openai")
router = APIRouter(tags=["openai"])
DISCONNECT_CHECK_SECONDS = 1.0


def _from_wiro(exc: WiroError, spec=None) -> OpenAIError:
    """A Wiro error of the shared Run path in OpenAI's shape (the field mapped back to OpenAI's name)."""
    message = f"{exc.message}: {exc.detail}" if exc.detail and exc.detail not in exc.message else exc.message
    if exc.status == 401:
        return OpenAIError(401, message, code="invalid_api_key")
    if exc.status == 429 or exc.code == 96:
        return OpenAIError(429, message, code="rate_limit_exceeded", type_="requests", headers=exc.headers)
    if exc.status >= 500:
        return OpenAIError(exc.status, message, code="server_error", headers=exc.headers)
    if exc.status == 413:
        return OpenAIError(413, message, code="request_too_large", retry=False)
    param = param_of_message(spec, message) if spec is not None else None
    slots = spec.openai.get("images", []) if spec is not None else []
    for number, slot in enumerate(slots, 1):
        if param == "image" and f"[{slot}]" in message:
            message += f" ('{slot}' is filled by image {number} of {len(slots)} in 'image')"
    return OpenAIError(400, message, param, "invalid_value")


async def _guard(coro) -> Response:
    """Run an endpoint, answering every error in OpenAI's shape (an unexpected one logged, never shown)."""
    try:
        return await coro
    except OpenAIError as exc:
        return exc.response()
    except WiroError as exc:
        return _from_wiro(exc).response()
    except Exception:
        log.exception("OpenAI API: unhandled error")
        return OpenAIError(500, "Internal server error; the operator's log has the details.",
                           code="server_error").response()


async def _project(svc: Services, request: Request) -> Project:
    """The project of ``Authorization: Bearer <key>``: an API-key project, after the rate limit."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise OpenAIError(401, "You didn't provide an API key. Send the API key of an Easel API-key project as "
                               "'Authorization: Bearer <key>' (the openai clients' api_key / apiKey).", retry=False)
    project = svc.projects.peek(key) or await svc.in_thread(svc.projects.get, key)
    if project is None:
        raise OpenAIError(401, "Incorrect API key provided: no Easel project has this key.", code="invalid_api_key",
                          retry=False)
    if project.auth_mode != "apikey":
        raise OpenAIError(401, "This key belongs to a signature project, which needs Wiro's x-nonce and x-signature "
                               "headers; the OpenAI API takes the key alone. Make an API-key project: "
                               "easel projects create NAME --auth apikey.", code="invalid_api_key", retry=False)
    try:
        if svc.auth_needs_io:
            return await svc.in_thread(deps.rate_limited, svc, request, project)
        return deps.rate_limited(svc, request, project)
    except WiroError as exc:
        raise _from_wiro(exc) from None


def _wait_limit(svc: Services, request: Request) -> float:
    limit = svc.settings.api.openai_wait_seconds
    asked = prefer_wait(request.headers.get("prefer", ""))
    return float(limit if asked is None else min(limit, asked))


async def _submit(svc: Services, project: Project, request: Request, mapped: Mapped) -> Task:
    """Create the task through :func:`easel.api.routes.run.submit` (the Wiro Run path) and return it."""
    body = Body(fields=dict(mapped.fields), files=[Upload(slot, name, data) for slot, name, data in mapped.images])
    try:
        answer = await svc.in_thread(submit, svc, project, mapped.spec.owner, mapped.spec.slug, body,
                                     request.headers.get("idempotency-key", ""))
    except WiroError as exc:
        raise _from_wiro(exc, mapped.spec) from None
    return await run_in_threadpool(svc.store.get_task, int(answer["taskid"]))


def _stop(svc: Services, task_id: int) -> None:
    """Cancel a queued task or ask a running one to die (a disconnected client, when enabled)."""
    task = svc.store.get_task(task_id)
    if task is not None and task.status not in lc.TERMINAL:
        if not (task.status == lc.QUEUE and lc.cancel(svc.store, task_id)):
            lc.request_kill(svc.store, task_id)


async def _wait(svc: Services, request: Request, task: Task, seconds: float) -> Task:
    """Wait for the task's end (at most ``seconds``); with ``openai_kill_on_disconnect``, stop it
    when the client goes away."""
    deadline = time.monotonic() + seconds
    watch_client = svc.settings.api.openai_kill_on_disconnect
    while True:
        left = max(0.0, deadline - time.monotonic())
        task = await views.wait_for_end(svc, task.id, min(left, DISCONNECT_CHECK_SECONDS) if watch_client else left)
        if task.status in lc.TERMINAL or time.monotonic() >= deadline:
            return task
        if watch_client and await request.is_disconnected():
            await svc.in_thread(_stop, svc, task.id)
            raise OpenAIError(499, "The client closed the request; its task was stopped.", code="client_closed")


def _ended_badly(task: Task, waited: float) -> OpenAIError | None:
    """The error for a task that did not succeed (or is still running after ``waited`` seconds)."""
    if task.status == lc.CANCEL:
        how = "killed" if task.pexit == "-1" else "cancelled"
        return failure(409, f"Task {task.id} was {how} before it finished (Wiro Task/Kill or Task/Cancel).",
                       f"task_{how}", task.id)
    if task.status not in lc.TERMINAL:
        return failure(504, f"Task {task.id} is still {task.status} after {waited:g} s (EASEL_OPENAI_WAIT_SECONDS or "
                            f"Prefer: wait). It keeps running: fetch its result with POST /v1/Task/Detail "
                            f"{{\"taskid\": \"{task.id}\"}} or follow it on the WebSocket.", "deadline_exceeded",
                       task.id)
    if task.pexit != "0":
        reason = (task.debugerror or "").strip().splitlines()
        return failure(500, f"Task {task.id} failed: {reason[-1][:500] if reason else 'no reason was recorded'}",
                       "task_failed", task.id)
    return None


def _encode(data: bytes, fmt: str, quality: int) -> bytes:
    """``data`` (an image file) re-encoded as ``fmt`` (``png`` PNG bytes pass unchanged)."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    if fmt == "png" and image.format == "PNG":
        return data
    buf = io.BytesIO()
    image = image.convert("RGB")
    if fmt == "png":
        image.save(buf, "PNG")
    else:
        image.save(buf, "JPEG" if fmt == "jpeg" else "WEBP", quality=max(1, quality))
    return buf.getvalue()


def _images(svc: Services, task: Task, mapped: Mapped) -> list[dict]:
    """The task's main images (no ``extra-*`` outputs) as OpenAI's ``data`` items."""
    items = []
    for out in svc.store.outputs(task.id):
        if out.name.startswith("extra-") or not out.contenttype.startswith("image/"):
            continue
        if mapped.response_format == "url":
            items.append({"url": svc.storage.url(task.file_accesskey, out.name, key=f"files/{out.path}")})
        else:
            data = _encode(svc.storage.get_bytes(output_key(out.path)), mapped.output_format,
                           mapped.output_compression)
            items.append({"b64_json": base64.b64encode(data).decode()})
    return items


def _answer(svc: Services, task: Task, mapped: Mapped) -> dict:
    answer: dict[str, Any] = {"created": int(task.postprocessendtime or time.time()), "data": _images(svc, task, mapped),
                              "background": "opaque", "output_format": mapped.output_format, "quality": "auto"}
    if mapped.size:
        answer["size"] = mapped.size
    return answer


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _stream(svc: Services, task: Task, mapped: Mapped, prefix: str, seconds: float) -> AsyncIterator[bytes]:
    """The SSE stream of one task: partial images from its step previews, then the completed images."""
    common = {"background": "opaque", "output_format": mapped.output_format, "quality": "auto",
              "size": mapped.size or "auto"}
    deadline = time.monotonic() + seconds
    last, sent, finished = 0, 0, False
    try:
        with svc.wakeups.watch(task.id) as watch:
            while not finished:
                watch.clear()
                for ev in await run_in_threadpool(svc.store.events, task.id, last, mapped.partial_images > 0):
                    last = ev.seq
                    if ev.preview and sent < mapped.partial_images:
                        partial = await run_in_threadpool(_encode, base64.b64decode(ev.preview), mapped.output_format,
                                                          mapped.output_compression)
                        yield _sse(f"{prefix}.partial_image", {
                            "type": f"{prefix}.partial_image", "b64_json": base64.b64encode(partial).decode(),
                            "created_at": int(time.time()), "partial_image_index": sent, **common})
                        sent += 1
                    finished = finished or ev.type in lc.TERMINAL
                if finished or time.monotonic() >= deadline:
                    break
                current = await run_in_threadpool(svc.store.get_task, task.id)
                delay = svc.settings.live.live_fallback_poll_interval if svc.wakeups.pushing else \
                    lc.poll_delay(current, svc.settings.live.live_poll_interval, cap=0.5)
                await watch.wait(min(delay, max(0.0, deadline - time.monotonic())))
        task = await run_in_threadpool(svc.store.get_task, task.id)
        error = _ended_badly(task, seconds)
        if error is not None:
            yield _sse("error", {"type": "error", **error.body()})
            return
        b64 = Mapped(spec=mapped.spec, fields={}, response_format="b64_json", output_format=mapped.output_format,
                     output_compression=mapped.output_compression)
        for item in await run_in_threadpool(_images, svc, task, b64):
            yield _sse(f"{prefix}.completed", {
                "type": f"{prefix}.completed", "b64_json": item["b64_json"], "created_at": int(time.time()),
                "usage": {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                          "output_tokens": 0, "total_tokens": 0}, **common})
    except (asyncio.CancelledError, GeneratorExit):
        if svc.settings.api.openai_kill_on_disconnect:
            svc.threads.submit(_stop, svc, task.id)
        raise
    except Exception:
        log.exception("OpenAI API: stream of task %s failed", task.id)
        yield _sse("error", {"type": "error", **OpenAIError(500, "Internal server error; the operator's log has the "
                                                                 "details.", code="server_error").body()})


async def _images_request(request: Request, svc: Services, endpoint: str) -> Response:
    project = await _project(svc, request)
    if endpoint == "generations":
        raw = await read_capped(request, svc.settings.api.body_max_bytes)
        try:
            fields = json.loads(raw.decode("utf-8-sig") or "null")
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise OpenAIError(400, "We could not parse the JSON body of your request: send a JSON object.",
                              code="invalid_json") from None
        if not isinstance(fields, dict):
            raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
        uploads: list[tuple[str, bytes]] = []
    else:
        body = await parse_body(request, svc.settings.fetch.upload_max_bytes, svc.settings.api.request_max_bytes,
                                svc.settings.api.body_max_bytes)
        fields = dict(body.fields)
        unknown = [up.field for up in body.files if up.field not in ("image", "mask")]
        if unknown:
            raise OpenAIError(400, f"Unrecognized file field: {unknown[0]}. Send the images as 'image' (or "
                                   "'image[]').", unknown[0], "unknown_parameter")
        if any(up.field == "mask" for up in body.files):
            fields["mask"] = "<file>"
        uploads = [(up.filename, up.data) for up in body.files if up.field == "image"]
    spec = find_model(svc.tools, fields.get("model"))
    mapped = map_request(spec, fields, endpoint, svc.catalog, uploads)
    task = await _submit(svc, project, request, mapped)
    seconds = _wait_limit(svc, request)
    headers = {"x-easel-task-id": str(task.id)}
    if mapped.stream:
        prefix = "image_generation" if endpoint == "generations" else "image_edit"
        return StreamingResponse(_stream(svc, task, mapped, prefix, seconds), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})
    task = await _wait(svc, request, task, seconds)
    error = _ended_badly(task, seconds)
    if error is not None:
        raise error
    answer = await run_in_threadpool(_answer, svc, task, mapped)
    return JSONResponse(answer, headers=headers)


@router.post("/v1/images/generations", summary="OpenAI: create images from a prompt (docs/openai.md)")
async def generations(request: Request, svc: Services = Depends(deps.services)):
    return await _guard(_images_request(request, svc, "generations"))


@router.post("/v1/images/edits", summary="OpenAI: edit uploaded images (IC-Light, InstantID; docs/openai.md)")
async def edits(request: Request, svc: Services = Depends(deps.services)):
    return await _guard(_images_request(request, svc, "edits"))


async def _models(request: Request, svc: Services, model_id: str | None) -> Response:
    await _project(svc, request)
    if model_id is None:
        return JSONResponse({"object": "list", "data": [model_object(s) for s in openai_tools(svc.tools)]})
    return JSONResponse(model_object(find_model(svc.tools, model_id)))


@router.get("/v1/models", summary="OpenAI: the tools as model objects")
async def models(request: Request, svc: Services = Depends(deps.services)):
    return await _guard(_models(request, svc, None))


@router.get("/v1/models/{model_id:path}", summary="OpenAI: one tool as a model object")
async def model(request: Request, model_id: str, svc: Services = Depends(deps.services)):
    return await _guard(_models(request, svc, model_id))
