"""The OpenAPI document: FastAPI's, plus one ``/v1/Run/{owner}/{slug}`` path per runnable tool
with its inputs as a JSON schema, and the request bodies of the Wiro endpoints (which parse their
bodies by hand, :func:`easel.api.deps.body`, so FastAPI cannot describe them)."""
from __future__ import annotations

from typing import Callable

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from . import toolinfo
from .services import Services

_TASK_REF = {"type": "object", "properties": {
    "taskid": {"type": "string", "description": "Task id (digits)"},
    "tasktoken": {"type": "string", "description": "or the task's socketaccesstoken"}}}
_PAGE = {"start": {"type": "string", "description": "offset (digits)"},
         "limit": {"type": "string", "description": "page size (digits)"}}
REQUEST_SCHEMAS = {
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


def document(app: FastAPI, svc: Services) -> Callable[[], dict]:
    """The ``app.openapi`` function: builds the document once (on first use) and caches it in
    ``app.openapi_schema``."""

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for spec in svc.tools.values():
            if not spec.module:
                continue
            schema = toolinfo.input_schema(spec, svc.catalog)
            doc["paths"][f"/v1/Run/{spec.owner}/{spec.slug}"] = {"post": {
                "summary": f"Run {spec.owner}/{spec.slug}", "description": spec.description,
                "tags": ["tools"], "operationId": f"run_{spec.owner}_{spec.slug}".replace("-", "_"),
                "requestBody": {"required": True, "content": {"application/json": {"schema": schema},
                                                              "multipart/form-data": {"schema": schema}}},
                "responses": {"200": {"description": "`{errors, taskid, socketaccesstoken, result}`"}},
            }}
        for path, schema in REQUEST_SCHEMAS.items():  # bodies are parsed by hand: describe them here
            if path in doc["paths"]:
                doc["paths"][path]["post"]["requestBody"] = {
                    "required": True, "content": {"application/json": {"schema": schema},
                                                  "multipart/form-data": {"schema": schema}}}
        app.openapi_schema = doc
        return doc

    return openapi
