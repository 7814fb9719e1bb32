"""The FastAPI application: Wiro's Run, Task and Tool endpoints, output files, the live WebSocket,
and the webhook dispatcher. Beyond Wiro: ``Idempotency-Key`` and ``Prefer: wait=N`` on Run,
``Task/List``, a rate limit (HTTP 429, :mod:`.ratelimit`) and an OpenAPI document with every tool's inputs."""
from __future__ import annotations

import asyncio
import gc
import logging
import math
import mimetypes
import re
import time
import uuid as uuidlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import orjson
from fastapi import FastAPI, Request, WebSocket
from fastapi.openapi.utils import get_openapi
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from easel import strict
from easel.catalog import CatalogError, InputError, ModelCatalog, ToolSpec, load_tools
from easel.config import Settings
from easel.diskfull import DiskWatch
from easel.diskfull import MESSAGE as DISK_FULL
from easel.executors import Executor
from easel.storage import create_storage, output_key, upload_key, user_file_key
from easel.store import LimitReached, Project, SecretBox, Store, Task
from easel.store.notify import Hub, Publisher
from easel.tasks import lifecycle as lc

from . import compat, live, openai_api, toolinfo
from . import errors as E
from . import files as files_api
from . import metrics as http_metrics
from . import playground
from .auth import ProjectCache, authenticate, authenticate_without_io
from .errors import WiroError, error_response
from .parsing import Body, parse_body
from .ratelimit import RateLimiter
from .maintenance import Maintenance
from .webhooks import WebhookDispatcher, callback_url

log = logging.getLogger("easel.api")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_UPLOAD_KEY = re.compile(r"^[0-9a-f]{32}$")
_PREFER_WAIT = re.compile(r"(?:^|[;,\s])wait\s*=\s*([0-9]{1,9})(?![0-9])", re.I | re.ASCII)
MAX_PREFER_WAIT = 60


class Api:
    """Shared state of the HTTP layer."""

    def __init__(self, settings: Settings, executor: Executor | None):
        self.settings = settings
        # a connection for each thread that may use the store at once: the request threads, the
        # webhook senders, upkeep and metrics (no connection is opened and closed per request)
        self.store = Store(settings.database_url, pool_size=settings.api_threads + settings.webhook_concurrency + 4,
                           wakeups=Publisher.for_settings(settings), secrets=SecretBox.for_settings(settings))
        self.wakeups = Hub.for_settings(settings, self.store.wakeups)
        self.projects = ProjectCache(self.store)
        # the threads that run requests' store calls (asyncio's executor: a hop costs ~40 % less CPU
        # than anyio's thread pool)
        self.threads = ThreadPoolExecutor(max_workers=settings.api_threads, thread_name_prefix="easel-api")
        self.catalog = ModelCatalog.load(settings.catalog_override)
        self.tools = load_tools()
        self.storage = create_storage(settings)
        self.executor = executor
        self.limiter = RateLimiter(settings.rate_limit_per_minute, settings.redis_url, settings.redis_prefix)
        self.webhooks = WebhookDispatcher(settings, self.store, self.task_object)
        self.disk = DiskWatch(settings.data_dir)  # /healthz and HTTP 507 on a full disk (easel.diskfull)
        self.maintenance = Maintenance(settings, self.store, self.delete_files, self.storage,
                                       executor.maintain if executor is not None else None, self.disk)

    # -- helpers ------------------------------------------------------------------------------

    async def in_thread(self, fn, *args):
        """``fn(*args)`` in one of the API's threads (see ``Settings.api_threads``)."""
        return await asyncio.get_running_loop().run_in_executor(self.threads, fn, *args)

    @property
    def auth_needs_io(self) -> bool:
        """Whether the rate limit is checked over the network (in Redis): then no request is
        authenticated on the event loop."""
        return self.limiter.shared is not None

    def auth(self, request: Request, project: Project | None = None) -> Project:
        """The calling project (``project``: already authenticated by :func:`authenticate_without_io`),
        after the rate limit; raises :class:`WiroError`."""
        project = project or authenticate(request.headers, self.store, self.settings, self.projects)
        wait = self.limiter.check(f"project-{project.id}")  # the key's project: no secret in Redis
        if wait is not None:
            seconds = max(1, math.ceil(wait))
            raise WiroError(0, f"Too many requests: this API key may make {self.settings.rate_limit_per_minute} "
                               f"requests per minute. Retry after {seconds} s.", 429, {"Retry-After": str(seconds)})
        return project

    def view(self, task: Task, outputs: list | None = None, position: int | None = None) -> dict:
        """Wiro's task object (``outputs`` and queue ``position`` are read unless given)."""
        spec = self.tools.get(task.tool)
        if position is None and task.status == lc.QUEUE:
            position = lc.queue_positions(self.store, [task]).get(task.id)
        return lc.task_view(task, self.store.outputs(task.id) if outputs is None else outputs,
                            lambda t, o: self.storage.url(t.file_accesskey, o.name, key=f"files/{o.path}"),
                            spec.categories if spec else [], queueposition=position,
                            modeldescription=spec.description if spec else "",
                            modelid=toolinfo.tool_id(self.tools, spec) if spec else "0",
                            retention_seconds=self.settings.output_retention_seconds)

    def task_object(self, task_id: int) -> dict | None:
        task = self.store.get_task(task_id)
        return self.view(task) if task else None

    def output_list(self, task: Task) -> list:
        return self.view(task)["outputs"]

    def find_task(self, project: Project, fields: dict, not_found: WiroError | None = None) -> Task:
        """The project's task named by ``taskid``, ``tasktoken`` or ``socketaccesstoken``.

        Raises ``not_found`` (default: Wiro's code 1 "There is no task yet." for an unknown task,
        code 0 "You don't have any permission for this action." for another project's)."""
        task_id = str(fields.get("taskid", "") or "").strip()
        token = str(fields.get("tasktoken", "") or fields.get("socketaccesstoken", "") or "").strip()
        if not task_id and not token:
            raise WiroError(0, "taskid or socketaccesstoken is required")
        if task_id:
            try:
                task = self.store.get_task(task_id=strict.parse_id(task_id, "taskid"))
            except strict.StrictError as exc:
                raise WiroError(0, exc.message) from None
        else:
            task = self.store.get_task(token=token)
            if task is None and token.isascii() and token.isdigit() and len(token) <= strict.MAX_ID_DIGITS:
                task = self.store.get_task(task_id=int(token))  # code-examples.md sends the task id here
        if task is None:
            raise not_found or WiroError(1, E.NO_TASK)
        if task.project_id != project.id:
            raise not_found or WiroError(0, E.NO_PERMISSION)
        return task

    def tasklist(self, task: Task, total: bool = True) -> dict:
        """Detail's answer (``total`` "1"); Kill and Cancel answer without ``total``, as the seeds show."""
        head = {"total": "1"} if total else {}
        return {**head, "errors": [], "tasklist": [self.view(task)], "result": True}

    def check_sources(self, spec: ToolSpec, inputs: dict) -> None:
        """In hub mode, refuse a Run whose chosen catalog models have no configured source or a
        licence the operator has not accepted (``easel.weights.sources.license_problem``)."""
        if self.settings.model_source != "hub":
            return
        from easel.weights.sources import license_problem

        chosen = [(f"Request parameter [{i.name}]", mid) for i in spec.inputs if i.type in ("select", "multiselect")
                  for mid in (inputs[i.name] if i.type == "multiselect" else [inputs[i.name]])]
        chosen += [(f"{spec.name} cannot run on this server", mid) for mid in (spec.base_model, *spec.preset.values())]
        chosen = [(where, mid) for where, mid in chosen if isinstance(mid, str) and mid in self.catalog.entries]
        for licences in (False, True):  # an unknown source first: accepting a licence would not help
            for where, mid in chosen:
                entry = self.catalog.get(mid)
                try:
                    self.catalog.require_source(entry)
                except CatalogError as exc:
                    raise WiroError(0, f"{where}: {exc}") from None
                problem = license_problem(entry, self.settings) if licences else None
                if problem:
                    raise WiroError(0, f"{where}: {problem}")

    # -- endpoints (sync parts run in a thread) ----------------------------------------------

    def run(self, project: Project, owner: str, slug: str, body: Body, idempotency_key: str = "") -> dict:
        idempotency_key = idempotency_key.strip()[:255]
        if idempotency_key:
            first = self.store.task_by_idempotency(project.id, idempotency_key)
            if first is not None:
                return self.run_answer(first)
        spec = toolinfo.find_tool(self.tools, owner, slug)
        if spec is None:
            raise WiroError(1, E.TOOL_NOT_FOUND)
        if not spec.module:
            raise WiroError(1, E.TOOL_NOT_ACCESSIBLE, detail=f"{spec.name} is not implemented on this server yet.")
        fields = dict(body.fields)
        try:
            spec.check_lengths(fields)
        except InputError as exc:
            raise WiroError(0, exc.message) from None
        callback = callback_url(fields.pop("callbackUrl", ""), self.settings)
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
                    self.storage.put_bytes(upload_key(task_uuid, safe), up.data)
                except OSError:
                    log.exception("Run: could not store the upload %s of task %s", safe, task_uuid)
                    raise WiroError(0, "The server could not store the uploaded file; try again later.", 503) from None
                fields[target] = f"upload:{safe}"
                shown[target] = self.storage.url(task_uuid.replace("-", ""), safe)  # served: it is stored with the task
            compat.require_inputs(spec, fields)
            try:
                inputs = spec.validate(compat.zero_means_default(spec, fields), self.catalog)
                self.check_sources(spec, inputs)
                check_urls(spec, inputs)
            except InputError as exc:
                raise WiroError(0, exc.message) from None
            files_api.check_image_inputs(self, project, spec, inputs, task_uuid)
            limit = self.settings.max_concurrent_tasks
            try:
                task, created = lc.submit(
                    self.store, project_id=project.id, tool=spec.name, parameters={**fields, **shown}, inputs=inputs,
                    callbackurl=callback, cost_per_second=spec.cost_per_second or self.settings.default_cost_per_second,
                    uuid=task_uuid, idempotency_key=idempotency_key or None, max_unfinished=limit)
            except LimitReached:
                raise WiroError(96, E.CONCURRENCY, detail=f"This project may have up to {limit} unfinished (queued or "
                                "running) tasks at the same time. Wait for a task to finish, or ask the operator to "
                                "raise EASEL_MAX_CONCURRENT_TASKS.") from None
        except BaseException:  # a refused Run keeps none of its uploaded files
            if stored:
                self._drop_uploads(task_uuid)
            raise
        if not created and stored:  # an idempotent retry: the first task's files are the ones that count
            self._drop_uploads(task_uuid)
        if created and self.executor is not None:
            self.executor.submit(task.id)
        return self.run_answer(task)

    def _drop_uploads(self, task_uuid: str) -> None:
        """Remove a Run's uploads; a storage failure is logged (the retention sweeper removes
        orphaned uploads later) and never replaces the Run's own answer."""
        try:
            self.storage.delete_prefix(f"uploads/{task_uuid}/")
        except (OSError, ValueError):
            log.exception("could not remove the uploads of refused Run %s", task_uuid)

    @staticmethod
    def run_answer(task: Task) -> dict:
        return compat.run_data({"errors": [], "taskid": str(task.id), "socketaccesstoken": task.socketaccesstoken,
                                "result": True})

    async def wait_for_end(self, task_id: int, seconds: float) -> Task:
        """Wait until the task is terminal or ``seconds`` pass, holding no thread while asleep
        (many ``Prefer: wait`` requests must not exhaust the thread pool). Woken by the task's
        event wake-ups (:mod:`easel.store.notify`) when pushed, else polling as the socket does
        (backing off to 0.25 s while the task is queued)."""
        deadline = time.monotonic() + seconds
        delay = self.settings.live_poll_interval
        with self.wakeups.watch(task_id) as watch:
            while True:
                watch.clear()
                task = await run_in_threadpool(self.store.get_task, task_id)
                if task.status in lc.TERMINAL or time.monotonic() >= deadline:
                    return task
                if self.wakeups.pushing:
                    delay = self.settings.live_fallback_poll_interval
                elif task.status == lc.QUEUE:  # nothing ends before a worker claims it: back off to 0.25 s
                    delay = min(0.25, delay * 1.5)  # (200 queued waiters polling every 20 ms starved the worker)
                else:
                    delay = lc.poll_delay(task, self.settings.live_poll_interval, cap=1.0)
                await watch.wait(min(delay, max(0.0, deadline - time.monotonic())))

    def delete_io(self, project: Project, body: Body) -> dict:
        """Task/InputOutputDelete: remove a finished task's uploaded inputs and output files (idempotent)."""
        task = self.find_task(project, body.fields, not_found=WiroError(1, E.TASK_NOT_EXIST))
        if task.status not in lc.TERMINAL:
            raise WiroError(1, E.NOT_DELETABLE, detail=f"The task is {task.status}.")
        self.delete_files(task)
        return {"result": True, "errors": []}

    def delete_files(self, task: Task) -> None:
        """Remove a finished task's outputs, uploads and pending webhooks (InputOutputDelete and
        the retention sweeper); the task record stays."""
        self.store.drop_deliveries(task.id)
        for out in self.store.delete_outputs(task.id):
            try:
                self.storage.delete(output_key(out.path))
            except ValueError:  # a path no Easel wrote: nothing of ours to delete
                log.warning("task %s: output path %r is not a storage key", task.id, out.path)
        self.storage.delete_prefix(f"files/{task.uuid}/")
        self.storage.delete_prefix(f"uploads/{task.uuid}/")

    def task_list(self, project: Project, fields: dict) -> dict:
        """Task/List: the project's tasks, newest first; ``start``, ``limit``, ``status`` and the Wiro
        MCP's ``modelName`` (``owner/slug``, any case or clean form). ``total`` counts every match."""
        start, limit = _int_field(fields, "start", 0, 0, 10**9), _int_field(fields, "limit", 20, 1, 200)
        status = str(fields.get("status", "") or "") or None
        tool = None
        model = str(fields.get("modelName", "") or "").strip()
        if model:
            owner, _, slug = model.partition("/")
            spec = toolinfo.find_tool(self.tools, owner, slug)
            tool = spec.name if spec else model
        tasks = self.store.tasks_of(project.id, limit=limit, start=start, status=status, tool=tool)
        total = self.store.count_tasks(project.id, status=status, tool=tool)
        outputs = self.store.outputs_of(t.id for t in tasks)  # one query for the page, and one per queued task
        positions = lc.queue_positions(self.store, tasks)
        return {"result": True, "errors": [], "total": str(total),
                "tasklist": [self.view(t, outputs[t.id], positions.get(t.id)) for t in tasks]}

    def tool_list(self, fields: dict) -> dict:
        start, limit = _int_field(fields, "start", 0, 0, 10**9), _int_field(fields, "limit", 20, 1, 1000)
        cats, tags = _list_field(fields, "categories"), _list_field(fields, "tags")
        found = [spec for spec in self.tools.values()
                 if toolinfo.matches(spec, str(fields.get("search", "") or ""), cats, tags,
                                     str(fields.get("slugowner", "") or ""))]
        if str(fields.get("order", "")).upper() == "DESC":
            found.reverse()
        stats = self.store.tool_stats(lc.POSTPROCESS_END)
        return {"result": True, "errors": [], "total": len(found),
                "tool": [toolinfo.tool_summary(toolinfo.tool_id(self.tools, spec), spec, stats.get(spec.name))
                         for spec in found[start:start + limit]]}

    def tool_detail(self, fields: dict) -> dict:
        owner, slug = str(fields.get("slugowner", "") or ""), str(fields.get("slugproject", "") or "")
        spec = toolinfo.find_tool(self.tools, owner, slug)
        if spec is None:
            raise WiroError(1, E.TOOL_NOT_FOUND)
        stats = self.store.tool_stats(lc.POSTPROCESS_END).get(spec.name)
        return {"result": True, "errors": [],
                "tool": [toolinfo.tool_detail(toolinfo.tool_id(self.tools, spec), spec, self.catalog, stats)]}

    def tool_explore(self) -> dict:
        """Tool/Explore: the runnable tools grouped by category (the Wiro MCP's and WiroKit's ``explore``)."""
        return {"result": True, "errors": [], "explore": toolinfo.explore(self.tools, self.store.tool_stats(lc.POSTPROCESS_END))}

    def file_key(self, accesskey: str, name: str) -> tuple[str, str] | None:
        """``(storage key, content type)`` of the file served at ``/v1/File/{accesskey}/{name}``:
        an output (the task's file access key), a ``File/Upload`` file (its access key) or a
        Run's upload (the task's uuid without dashes, as shown in its ``parameters``); None if
        there is none (an unsafe name included)."""
        try:
            out = self.store.output_by_key(accesskey, name)
            if out is not None:
                return output_key(out.path), out.contenttype
            up = self.store.user_file_by_key(accesskey, name)
            if up is not None:
                return user_file_key(up.path), up.contenttype
            if _UPLOAD_KEY.match(accesskey):
                return upload_key(str(uuidlib.UUID(accesskey)), name), \
                    mimetypes.guess_type(name)[0] or "application/octet-stream"
        except ValueError:  # not a storage key: nothing Easel stored
            pass
        return None

    def cancel(self, project: Project, body: Body) -> dict:
        task = self.find_task(project, body.fields)
        if not lc.cancel(self.store, task.id):
            raise WiroError(1, E.NOT_CANCELLABLE)
        return self.tasklist(self.store.get_task(task.id), total=False)

    def kill_request(self, project: Project, body: Body) -> Task:
        task = self.find_task(project, body.fields)
        if task.status == lc.QUEUE and lc.cancel(self.store, task.id):
            return task
        if not lc.request_kill(self.store, task.id):
            current = self.store.get_task(task.id)
            raise WiroError(1, f"Task could not be killed: it is not running (status {current.status}).")
        return task


def _int_field(fields: dict, name: str, default: int, lo: int, hi: int) -> int:
    raw = fields.get(name, "")
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return default
    try:
        return min(hi, max(lo, strict.parse_int(raw, name)))
    except strict.StrictError as exc:
        raise WiroError(0, exc.message) from None


def check_urls(spec: ToolSpec, inputs: dict) -> None:
    """Refuse at Run, naming the field, a URL input (``...Url``) that is not an absolute http(s) URL
    (``file://``, ``gopher://``, no scheme) or not a URL at all (``http://[::1``, a port out of
    range): the worker would refuse it later anyway. Image inputs also take a ``File/Upload``
    file's bare name; :func:`files.check_image_inputs` checks those."""
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


def _list_field(fields: dict, name: str) -> list[str]:
    value = fields.get(name)
    if value in (None, "", []):
        return []
    if isinstance(value, list):
        return [str(v) for v in value if str(v)]
    return [v.strip() for v in str(value).split(",") if v.strip()]


_TASK_REF = {"type": "object", "properties": {
    "taskid": {"type": "string", "description": "Task id (digits)"},
    "tasktoken": {"type": "string", "description": "or the task's socketaccesstoken"}}}
_PAGE = {"start": {"type": "string", "description": "offset (digits)"},
         "limit": {"type": "string", "description": "page size (digits)"}}
_REQUEST_SCHEMAS = {
    "/v1/Task/Detail": _TASK_REF, "/v1/Task/Cancel": _TASK_REF, "/v1/Task/Kill": _TASK_REF,
    "/v1/Task/InputOutputDelete": _TASK_REF,
    "/v1/Task/List": {"type": "object", "properties": {**_PAGE, "status": {"type": "string"}}},
    "/v1/Tool/List": {"type": "object", "properties": {
        **_PAGE, "search": {"type": "string"}, "slugowner": {"type": "string"},
        "order": {"type": "string", "enum": ["ASC", "DESC"]},
        "categories": {"type": "array", "items": {"type": "string"}},
        "tags": {"type": "array", "items": {"type": "string"}}}},
    "/v1/Tool/Detail": {"type": "object", "required": ["slugowner", "slugproject"], "properties": {
        "slugowner": {"type": "string"}, "slugproject": {"type": "string"}}},
}


def respond(answer) -> Response:
    """A JSON answer serialised by orjson (no ``jsonable_encoder`` pass: answers are plain dicts
    of JSON types already); a :class:`Response` passes through."""
    if isinstance(answer, Response):
        return answer
    return Response(orjson.dumps(answer), media_type="application/json")


def prefer_wait(header: str) -> int | None:
    """Seconds asked for by ``Prefer: wait=N`` (capped at 60), or None."""
    m = _PREFER_WAIT.search(header or "")
    return min(MAX_PREFER_WAIT, int(m.group(1))) if m else None


def create_app(settings: Settings, executor: Executor | None = None, dispatch_webhooks: bool = True,
               on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """Build the app. ``executor`` is told about new tasks; None leaves them queued in the store
    (workers of another process poll it). ``dispatch_webhooks`` runs the webhook sender thread.
    ``on_shutdown`` runs when the server shuts down (SIGTERM/SIGINT included), e.g. to stop workers."""
    api = Api(settings, executor)

    @asynccontextmanager
    async def lifespan(_app):
        # threads for store calls: as many as the store has connections for (see Api.__init__)
        import anyio.to_thread

        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        if api.threads._shutdown:  # the app is started again (e.g. an in-process test client)
            api.threads = ThreadPoolExecutor(max_workers=settings.api_threads, thread_name_prefix="easel-api")
        # what start-up built lives as long as the process: out of the collector's reach, so that
        # a full collection under load walks only the objects of requests (shorter pauses)
        gc.collect()
        gc.freeze()
        if dispatch_webhooks:
            api.webhooks.start()
        api.maintenance.start()
        await api.wakeups.start()
        try:
            yield
        finally:
            await api.wakeups.stop()
            api.maintenance.stop()
            api.webhooks.stop()
            if on_shutdown is not None:
                await run_in_threadpool(on_shutdown)
            api.threads.shutdown(wait=False)

    app = FastAPI(title="Easel", version="0.2.0", lifespan=lifespan,
                  description="Self-hostable image generation server speaking the Wiro tool API. Every endpoint "
                              "answers Wiro's envelope `{result, errors: [{code, message}]}`; request errors are "
                              "HTTP 200 with `result: false`, as Wiro's docs state.")
    app.state.api = api
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "HEAD", "POST", "OPTIONS"], allow_headers=["*"],
                           expose_headers=["Retry-After", "Preference-Applied"], max_age=600)
    http_metrics.install(app, api)
    playground.install(app, settings)
    app.include_router(openai_api.router)  # /v1/images/*, /v1/models (docs/openai.md)

    @app.exception_handler(WiroError)
    async def _wiro_error(_request, exc: WiroError):
        return error_response(exc.code, exc.message, exc.status, exc.headers, exc.detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        if exc.status_code in (404, 405):
            return error_response(0, E.PARSE_URL, 404)
        return error_response(0, str(exc.detail), exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        return error_response(0, E.INVALID_BODY)

    @app.exception_handler(Exception)
    async def _unexpected(_request, exc: Exception):
        log.exception("unhandled error")
        return error_response(0, "Internal server error; the operator's log has the details.", 500)

    @app.exception_handler(OSError)
    @app.exception_handler(SQLAlchemyError)
    async def _io_error(request, exc: Exception):
        """A full disk (database or files) answers 507 and the server carries on; else as above."""
        if not api.disk.noticed(exc):
            return await _unexpected(request, exc)
        log.error("%s %s: the disk is full: %s", request.method, request.url.path, exc)
        return error_response(0, DISK_FULL, 507, {"Retry-After": "30"})

    async def body_of(request: Request) -> Body:
        return await parse_body(request, settings.upload_max_bytes, settings.request_max_bytes, settings.body_max_bytes)

    async def authed(request: Request) -> Project:
        """The calling project: on the event loop when that needs no I/O (a cached lenient or API-key
        project, a rate limit in this process's memory), else in a thread (store read, strict nonce
        write, the limit's window in Redis)."""
        project = None if api.auth_needs_io else authenticate_without_io(request.headers, settings, api.projects)
        if project is not None:
            return api.auth(request, project)
        return await api.in_thread(api.auth, request)

    async def handle(request: Request, fn, reads: bool = False):
        """Authenticate, parse the body, and run ``fn(project, body)``: in a thread (one hop per
        request), or, with ``reads`` (``fn`` makes only bounded indexed reads) on SQLite, on the
        event loop: a WAL reader never waits for a lock, and the hop (~0.07-0.1 ms of CPU and a GIL
        hand-over) would cost more than the reads."""
        project = await authed(request)
        body = await body_of(request)
        if reads and api.store.sqlite:
            return fn(project, body)
        return await api.in_thread(fn, project, body)

    @app.post("/v1/Run/{owner}/{slug}", summary="Run a tool (Wiro: POST /Run/{owner-slug}/{model-slug})",
              description="Headers beyond Wiro: `Idempotency-Key` (a retried Run returns the first task) and "
                          "`Prefer: wait=N` (N <= 60: answer when the task ends or N seconds pass, with the "
                          "task object under `tasklist`). Each tool's body is documented under its own path.",
              # the path parameters are read from the request (FastAPI's per-request validation of
              # declared parameters costs more than the rest of a Run's routing); documented here
              openapi_extra={"parameters": [{"name": name, "in": "path", "required": True,
                                             "schema": {"type": "string", "title": name.title()}}
                                            for name in ("owner", "slug")]})
    async def run(request: Request):
        owner, slug = request.path_params["owner"], request.path_params["slug"]
        project = await authed(request)
        body = await body_of(request)
        answer = await api.in_thread(api.run, project, owner, slug, body, request.headers.get("idempotency-key", ""))
        wait = prefer_wait(request.headers.get("prefer", ""))
        if wait is None:
            return respond(answer)
        task = await api.wait_for_end(int(answer["taskid"]), wait)
        answer = {**answer, "total": "1", "tasklist": [await run_in_threadpool(api.view, task)]}
        return JSONResponse(answer, headers={"Preference-Applied": f"wait={wait}"})

    @app.post("/v1/Task/Detail", summary="Task status, times, logs and outputs")
    async def detail(request: Request):
        return respond(await handle(request, lambda project, body: compat.detail_data(
            api.tasklist(api.find_task(project, body.fields))), reads=True))

    @app.post("/v1/Task/Cancel", summary="Cancel a queued task")
    async def cancel(request: Request):
        return respond(await handle(request, api.cancel))

    @app.post("/v1/Task/Kill", summary="Kill a running task (it stops within one denoising step)")
    async def kill(request: Request):
        task = await handle(request, api.kill_request)
        for _ in range(100):  # answer with the final state when the worker acknowledges quickly
            current = await run_in_threadpool(api.store.get_task, task.id)
            if current.status in lc.TERMINAL:
                break
            await asyncio.sleep(0.1)
        return respond(await run_in_threadpool(api.tasklist, current, False))

    @app.post("/v1/Task/InputOutputDelete", summary="Delete a finished task's input and output files")
    async def input_output_delete(request: Request):
        return respond(await handle(request, api.delete_io))

    @app.post("/v1/Task/List", summary="The project's tasks, newest first (beyond Wiro)")
    async def task_list(request: Request):
        return respond(await handle(request, lambda project, body: api.task_list(project, body.fields), reads=True))

    @app.post("/v1/Tool/List", summary="Tools on this server (start, limit, search, categories, tags, slugowner)")
    async def tool_list(request: Request):
        return respond(await handle(request, lambda _project, body: api.tool_list(body.fields)))

    @app.post("/v1/Tool/Detail", summary="One tool with its inputs in Wiro's parameter format")
    async def tool_detail(request: Request):
        return respond(await handle(request, lambda _project, body: api.tool_detail(body.fields)))

    @app.post("/v1/Tool/Explore", summary="Runnable tools grouped by category (Wiro MCP's explore)")
    async def tool_explore(request: Request):
        return respond(await handle(request, lambda _project, _body: api.tool_explore()))

    @app.websocket(settings.ws_path)
    async def socket(ws: WebSocket):
        await live.serve_socket(ws, api.store, api.output_list, poll=settings.live_poll_interval, hub=api.wakeups,
                                fallback=settings.live_fallback_poll_interval)

    @app.post("/v1/File/FolderCreate", summary="Create a folder for uploaded files (name, parentid)")
    async def folder_create(request: Request):
        return respond(await handle(request, lambda project, body: files_api.folder_create(api, project, body)))

    @app.post("/v1/File/Upload", summary="Upload a file (multipart `file`, optional `folderid`) to use in Runs")
    async def file_upload(request: Request):
        return respond(await handle(request, lambda project, body: files_api.upload(api, project, body)))

    @app.api_route("/v1/File/{accesskey}/{name}", methods=["GET", "HEAD"],
                   summary="An output, an uploaded input or a File/Upload file (the key in the URL is the credential)")
    async def file(accesskey: str, name: str, request: Request):
        found = await run_in_threadpool(api.file_key, accesskey, name)
        if found is None:
            raise WiroError(1, "There is no file.", 404)
        return await files_api.serve(api.storage, *found, head=request.method == "HEAD")

    @app.get("/healthz", include_in_schema=False)
    async def healthz():
        ok, why = executor.health() if executor is not None else (True, "API only (no local workers)")
        full = api.disk.problem()
        ok, why = (False, full) if full else (ok, why)
        return JSONResponse({"ok": ok, "reason": why}, status_code=200 if ok else 503)

    @app.get("/readyz", include_in_schema=False)
    async def readyz():
        """Whether a task would start now: a worker has imported torch and loaded the preloaded
        tools; which tools are warm (``Executor.ready``). 503 until then."""
        info = executor.ready() if executor is not None else {"ready": True, "workers": [], "warm": []}
        return JSONResponse(info, status_code=200 if info["ready"] else 503)

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for spec in api.tools.values():
            if not spec.module:
                continue
            schema = toolinfo.input_schema(spec, api.catalog)
            doc["paths"][f"/v1/Run/{spec.owner}/{spec.slug}"] = {"post": {
                "summary": f"Run {spec.owner}/{spec.slug}", "description": spec.description,
                "tags": ["tools"], "operationId": f"run_{spec.owner}_{spec.slug}".replace("-", "_"),
                "requestBody": {"required": True, "content": {"application/json": {"schema": schema},
                                                              "multipart/form-data": {"schema": schema}}},
                "responses": {"200": {"description": "`{errors, taskid, socketaccesstoken, result}`"}},
            }}
        for path, schema in _REQUEST_SCHEMAS.items():  # bodies are parsed by hand: describe them here
            if path in doc["paths"]:
                doc["paths"][path]["post"]["requestBody"] = {
                    "required": True, "content": {"application/json": {"schema": schema},
                                                  "multipart/form-data": {"schema": schema}}}
        app.openapi_schema = doc
        return doc

    app.openapi = openapi

    return app
