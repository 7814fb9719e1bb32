"""The FastAPI application: Run, Task/Detail, Task/Cancel, Task/Kill and output files."""
from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid as uuidlib
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from easel.catalog import CatalogError, InputError, ModelCatalog, ToolSpec, load_tools
from easel.config import Settings
from easel.executors import Executor
from easel.storage import LocalStorage
from easel.store import Project, Store, Task
from easel.tasks import lifecycle as lc

from . import errors as E
from .auth import authenticate
from .errors import WiroError, error_response
from .parsing import Body, parse_body

log = logging.getLogger("easel.api")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class Api:
    """Shared state of the HTTP layer."""

    def __init__(self, settings: Settings, executor: Executor | None):
        self.settings = settings
        self.store = Store(settings.database_url)
        self.catalog = ModelCatalog.load(settings.catalog_override)
        self.tools = load_tools()
        self.storage = LocalStorage(settings)
        self.executor = executor

    # -- helpers ------------------------------------------------------------------------------

    def auth(self, request: Request) -> Project:
        return authenticate(request.headers, self.store, self.settings)

    def view(self, task: Task) -> dict:
        spec = self.tools.get(task.tool)
        return lc.task_view(task, self.store.outputs(task.id),
                            lambda t, o: self.storage.url(t.file_accesskey, o.name),
                            spec.categories if spec else [])

    def find_task(self, project: Project, fields: dict) -> Task:
        task_id = str(fields.get("taskid", "") or "").strip()
        token = str(fields.get("tasktoken", "") or fields.get("socketaccesstoken", "") or "").strip()
        if not task_id and not token:
            raise WiroError(0, "taskid or socketaccesstoken is required")
        if task_id:
            task = self.store.get_task(task_id=int(task_id)) if task_id.isdigit() else None
        else:
            task = self.store.get_task(token=token)
        if task is None:
            raise WiroError(1, E.NO_TASK)
        if task.project_id != project.id:
            raise WiroError(0, E.NO_PERMISSION)
        return task

    def tasklist(self, task: Task) -> dict:
        return {"total": "1", "errors": [], "tasklist": [self.view(task)], "result": True}

    def check_sources(self, spec: ToolSpec, inputs: dict) -> None:
        """In hub mode, refuse a Run whose chosen catalog models have no configured source."""
        if self.settings.model_source != "hub":
            return
        for i in spec.inputs:
            if i.type in ("select", "multiselect"):
                chosen = inputs[i.name] if i.type == "multiselect" else [inputs[i.name]]
                for mid in chosen:
                    if mid in self.catalog.entries:
                        try:
                            self.catalog.require_source(self.catalog.get(mid))
                        except CatalogError as exc:
                            raise WiroError(0, f"Request parameter [{i.name}]: {exc}") from None
        fixed = [mid for mid in (spec.base_model, spec.preset.get("lora")) if mid]
        for mid in fixed:
            try:
                self.catalog.require_source(self.catalog.get(mid))
            except CatalogError as exc:
                raise WiroError(0, f"{spec.name} cannot run on this server: {exc}") from None

    # -- endpoints (sync parts run in a thread) ----------------------------------------------

    def run(self, project: Project, owner: str, slug: str, body: Body) -> dict:
        spec = self.tools.get(f"{owner}/{slug}")
        if spec is None:
            raise WiroError(1, E.TOOL_NOT_FOUND)
        if not spec.module:
            raise WiroError(1, f"{E.TOOL_NOT_ACCESSIBLE}: {spec.name} is not implemented on this server yet")
        fields = dict(body.fields)
        callback = str(fields.pop("callbackUrl", "") or "").strip()
        if urlsplit(callback).scheme not in ("http", "https") or not urlsplit(callback).hostname:
            callback = ""  # Wiro clients often send the doc's sentence here; it must not fail the Run
        task_uuid = str(uuidlib.uuid4())
        names = {i.name for i in spec.inputs}
        saved: list[Path] = []
        for up in body.files:
            target = up.field if up.field in names else f"{up.field}Url" if f"{up.field}Url" in names else None
            if target is None:
                continue
            folder = self.settings.uploads_dir / task_uuid
            folder.mkdir(parents=True, exist_ok=True)
            safe = f"{target}-{_SAFE_NAME.sub('_', Path(up.filename).name)[:100] or 'file'}"
            (folder / safe).write_bytes(up.data)
            saved.append(folder / safe)
            fields[target] = f"upload:{safe}"
        try:
            inputs = spec.validate(fields, self.catalog)
            self.check_sources(spec, inputs)
        except InputError as exc:
            raise WiroError(0, exc.message) from None
        task = lc.submit(self.store, project_id=project.id, tool=spec.name, parameters=fields, inputs=inputs,
                         callbackurl=callback, cost_per_second=spec.cost_per_second, uuid=task_uuid)
        if self.executor is not None:
            self.executor.submit(task.id)
        return {"errors": [], "taskid": str(task.id), "socketaccesstoken": task.socketaccesstoken, "result": True}

    def cancel(self, project: Project, body: Body) -> dict:
        task = self.find_task(project, body.fields)
        if not lc.cancel(self.store, task.id):
            raise WiroError(1, E.NOT_CANCELLABLE)
        return self.tasklist(self.store.get_task(task.id))

    def kill_request(self, project: Project, body: Body) -> Task:
        task = self.find_task(project, body.fields)
        if task.status == lc.QUEUE and lc.cancel(self.store, task.id):
            return task
        if not lc.request_kill(self.store, task.id):
            current = self.store.get_task(task.id)
            raise WiroError(1, f"Task could not be killed: it is not running (status {current.status}).")
        return task


def create_app(settings: Settings, executor: Executor | None = None) -> FastAPI:
    """Build the app. ``executor`` is told about new tasks; None leaves them queued in the store."""
    api = Api(settings, executor)
    app = FastAPI(title="Easel", version="0.1.0",
                  description="Self-hostable image generation server speaking the Wiro tool API.")
    app.state.api = api

    @app.exception_handler(WiroError)
    async def _wiro_error(_request, exc: WiroError):
        return error_response(exc.code, exc.message, exc.status)

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

    async def body_of(request: Request) -> Body:
        return await parse_body(request, settings.upload_max_bytes)

    @app.post("/v1/Run/{owner}/{slug}", summary="Run a tool (Wiro: POST /Run/{owner-slug}/{model-slug})")
    async def run(owner: str, slug: str, request: Request):
        project = await run_in_threadpool(api.auth, request)
        body = await body_of(request)
        return await run_in_threadpool(api.run, project, owner, slug, body)

    @app.post("/v1/Task/Detail", summary="Task status, times, logs and outputs")
    async def detail(request: Request):
        project = await run_in_threadpool(api.auth, request)
        body = await body_of(request)
        return await run_in_threadpool(lambda: api.tasklist(api.find_task(project, body.fields)))

    @app.post("/v1/Task/Cancel", summary="Cancel a queued task")
    async def cancel(request: Request):
        project = await run_in_threadpool(api.auth, request)
        body = await body_of(request)
        return await run_in_threadpool(api.cancel, project, body)

    @app.post("/v1/Task/Kill", summary="Kill a running task (it stops within one denoising step)")
    async def kill(request: Request):
        project = await run_in_threadpool(api.auth, request)
        body = await body_of(request)
        task = await run_in_threadpool(api.kill_request, project, body)
        for _ in range(100):  # answer with the final state when the worker acknowledges quickly
            current = await run_in_threadpool(api.store.get_task, task.id)
            if current.status in lc.TERMINAL:
                break
            await asyncio.sleep(0.1)
        return await run_in_threadpool(api.tasklist, current)

    @app.get("/v1/File/{accesskey}/{name}", summary="An output file (the access key is the credential)")
    async def file(accesskey: str, name: str):
        out = await run_in_threadpool(api.store.output_by_key, accesskey, name)
        if out is None:
            raise WiroError(1, "There is no file.", 404)
        return FileResponse(api.storage.path(out.path), media_type=out.contenttype)

    @app.get("/healthz", include_in_schema=False)
    async def healthz():
        return JSONResponse({"ok": True})

    return app
