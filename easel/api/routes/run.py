"""``POST /v1/Run/{owner}/{slug}``: validate a tool's inputs, store its uploads and queue the task.

Beyond Wiro: ``Idempotency-Key`` (a retried Run returns the first task) and ``Prefer: wait=N``
(answer when the task ends or N <= 60 seconds pass, with the task object under ``tasklist``).
:func:`submit` is the whole Run without HTTP: the OpenAI router queues its tasks through it too.
"""
from __future__ import annotations

import logging
import re
import uuid as uuidlib
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from easel.catalog import CatalogError, InputError, ToolSpec
from easel.storage import upload_key
from easel.store import LimitReached, Project
from easel.tasks import lifecycle as lc

from .. import compat, deps, toolinfo, views
from .. import errors as E
from .. import files as files_api
from ..deps import WiroCall
from ..errors import WiroError
from ..parsing import Body
from ..services import Services
from ..webhooks import callback_url

log = logging.getLogger("easel.api")
router = APIRouter()
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_PREFER_WAIT = re.compile(r"(?:^|[;,\s])wait\s*=\s*([0-9]{1,9})(?![0-9])", re.I | re.ASCII)
MAX_PREFER_WAIT = 60


def prefer_wait(header: str) -> int | None:
    """Seconds asked for by ``Prefer: wait=N`` (capped at 60), or None."""
    m = _PREFER_WAIT.search(header or "")
    return min(MAX_PREFER_WAIT, int(m.group(1))) if m else None


@router.post("/v1/Run/{owner}/{slug}", summary="Run a tool (Wiro: POST /Run/{owner-slug}/{model-slug})",
             description="Headers beyond Wiro: `Idempotency-Key` (a retried Run returns the first task) and "
                         "`Prefer: wait=N` (N <= 60: answer when the task ends or N seconds pass, with the "
                         "task object under `tasklist`). Each tool's body is documented under its own path.",
             # the path parameters are read from the request (FastAPI's per-request validation of
             # declared parameters costs more than the rest of a Run's routing); documented here
             openapi_extra={"parameters": [{"name": name, "in": "path", "required": True,
                                            "schema": {"type": "string", "title": name.title()}}
                                           for name in ("owner", "slug")]})
async def run(request: Request, wiro: WiroCall = Depends(deps.wiro)):
    svc, project, body = wiro.svc, wiro.project, wiro.body
    owner, slug = request.path_params["owner"], request.path_params["slug"]
    answer = await svc.in_thread(submit, svc, project, owner, slug, body, request.headers.get("idempotency-key", ""))
    wait = prefer_wait(request.headers.get("prefer", ""))
    if wait is None:
        return deps.respond(answer)
    task = await views.wait_for_end(svc, int(answer["taskid"]), wait)
    answer = {**answer, "total": "1", "tasklist": [await run_in_threadpool(views.task_view, svc, task)]}
    return JSONResponse(answer, headers={"Preference-Applied": f"wait={wait}"})


def submit(svc: Services, project: Project, owner: str, slug: str, body: Body, idempotency_key: str = "") -> dict:
    """Run ``owner/slug`` for ``project`` with ``body``'s fields and files; Run's answer
    (``{errors, taskid, socketaccesstoken, result}``). A retry with the same ``idempotency_key``
    answers the first task. Blocking (store and storage I/O): call it in a request thread.

    Raises:
        WiroError: code 1 for an unknown or unimplemented tool, code 0 naming the field for a bad
            input, code 96 when the project has too many unfinished tasks, 503 when an upload
            cannot be stored. A refused Run keeps none of its uploaded files.
    """
    idempotency_key = idempotency_key.strip()[:255]
    if idempotency_key:
        first = svc.store.task_by_idempotency(project.id, idempotency_key)
        if first is not None:
            return views.run_answer(first)
    spec = toolinfo.find_tool(svc.tools, owner, slug)
    if spec is None:
        raise WiroError(1, E.TOOL_NOT_FOUND)
    if not spec.module:
        raise WiroError(1, E.TOOL_NOT_ACCESSIBLE, detail=f"{spec.name} is not implemented on this server yet.")
    fields = dict(body.fields)
    try:
        spec.check_lengths(fields)
    except InputError as exc:
        raise WiroError(0, exc.message) from None
    callback = callback_url(fields.pop("callbackUrl", ""), svc.settings)
    task_uuid = str(uuidlib.uuid4())
    names = {i.name for i in spec.inputs}
    shown: dict[str, str] = {}  # uploaded inputs as the client sees them in parameters: file URLs
    stored = False  # whether this Run stored uploads (removed again if it is refused)
    try:
        for up in body.files:
            target = up.field if up.field in names else f"{up.field}Url" if f"{up.field}Url" in names else None
            if target is None:
                continue
            safe = f"{target}-{_SAFE_NAME.sub('_', Path(up.filename).name)[:100] or 'file'}"
            stored = True
            try:
                svc.storage.put_bytes(upload_key(task_uuid, safe), up.data)
            except OSError:
                log.exception("Run: could not store the upload %s of task %s", safe, task_uuid)
                raise WiroError(0, "The server could not store the uploaded file; try again later.", 503) from None
            fields[target] = f"upload:{safe}"
            shown[target] = svc.storage.url(task_uuid.replace("-", ""), safe)  # served: it is stored with the task
        compat.require_inputs(spec, fields)
        try:
            inputs = spec.validate(compat.zero_means_default(spec, fields), svc.catalog)
            check_sources(svc, spec, inputs)
            check_urls(spec, inputs)
        except InputError as exc:
            raise WiroError(0, exc.message) from None
        files_api.check_image_inputs(svc, project, spec, inputs, task_uuid)
        limit = svc.settings.api.max_concurrent_tasks
        try:
            task, created = lc.submit(
                svc.store, project_id=project.id, tool=spec.name, parameters={**fields, **shown}, inputs=inputs,
                callbackurl=callback, cost_per_second=spec.cost_per_second or svc.settings.api.default_cost_per_second,
                uuid=task_uuid, idempotency_key=idempotency_key or None, max_unfinished=limit)
        except LimitReached:
            raise WiroError(96, E.CONCURRENCY, detail=f"This project may have up to {limit} unfinished (queued or "
                            "running) tasks at the same time. Wait for a task to finish, or ask the operator to "
                            "raise EASEL_MAX_CONCURRENT_TASKS.") from None
    except BaseException:  # a refused Run keeps none of its uploaded files
        if stored:
            _drop_uploads(svc, task_uuid)
        raise
    if not created and stored:  # an idempotent retry: the first task's files are the ones that count
        _drop_uploads(svc, task_uuid)
    if created and svc.executor is not None:
        svc.executor.submit(task.id)
    return views.run_answer(task)


def _drop_uploads(svc: Services, task_uuid: str) -> None:
    """Remove a Run's uploads; a storage failure is logged (the retention sweeper removes
    orphaned uploads later) and never replaces the Run's own answer."""
    try:
        svc.storage.delete_prefix(f"uploads/{task_uuid}/")
    except (OSError, ValueError):
        log.exception("could not remove the uploads of refused Run %s", task_uuid)


def check_sources(svc: Services, spec: ToolSpec, inputs: dict) -> None:
    """In hub mode, refuse a Run whose chosen catalog models have no configured source or a
    licence the operator has not accepted (``easel.weights.licenses.license_problem``).

    Raises:
        WiroError: code 0, naming the request parameter (or the tool) and the problem.
    """
    if svc.settings.weights.model_source != "hub":
        return
    from easel.weights.licenses import license_problem

    chosen = [(f"Request parameter [{i.name}]", mid) for i in spec.inputs if i.type in ("select", "multiselect")
              for mid in (inputs[i.name] if i.type == "multiselect" else [inputs[i.name]])]
    chosen += [(f"{spec.name} cannot run on this server", mid) for mid in (spec.base_model, *spec.preset.values())]
    chosen = [(where, mid) for where, mid in chosen if isinstance(mid, str) and mid in svc.catalog.entries]
    for licences in (False, True):  # an unknown source first: accepting a licence would not help
        for where, mid in chosen:
            entry = svc.catalog.get(mid)
            try:
                svc.catalog.require_source(entry)
            except CatalogError as exc:
                raise WiroError(0, f"{where}: {exc}") from None
            problem = license_problem(entry, svc.settings.weights, svc.settings.core.models_dir) if licences else None
            if problem:
                raise WiroError(0, f"{where}: {problem}")


def check_urls(spec: ToolSpec, inputs: dict) -> None:
    """Refuse at Run, naming the field, a URL input (``...Url``) that is not an absolute http(s) URL
    (``file://``, ``gopher://``, no scheme) or not a URL at all (``http://[::1``, a port out of
    range): the worker would refuse it later anyway. Image inputs also take a ``File/Upload``
    file's bare name; :func:`files.check_image_inputs` checks those.

    Raises:
        InputError: naming the field.
    """
    images = {i.name for i in spec.inputs if i.accepts == "image"}
    for name, value in inputs.items():
        if not name.lower().endswith("url") or not isinstance(value, str):
            continue
        value = value.strip()
        if not value or value.startswith("upload:") or (name in images and "://" not in value):
            continue
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 (raises ValueError for a port out of range)
        except ValueError as exc:  # e.g. "http://[::1": an unclosed IPv6 literal
            raise InputError(name, f"Request parameter [{name}] is not a valid URL: {exc}") from None
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise InputError(name, f"Request parameter [{name}] must be an http:// or https:// URL "
                                   f"(got {value[:60]!r})")
