"""The app's exception handlers: every error answers in Wiro's envelope (:mod:`.errors`), never
with a stack trace.

- :class:`~.errors.WiroError`: its code, message, status, headers and ``detail``;
- an unknown path or method (404/405): "Error parsing url." with 404, as Wiro answers;
- FastAPI's request validation: "Request parameters are invalid.";
- a full disk (``OSError``/``SQLAlchemyError`` that :class:`easel.diskfull.DiskWatch` recognises):
  507 with ``Retry-After: 30``, and the server carries on;
- anything else: 500, logged with its traceback for the operator.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from easel.diskfull import MESSAGE as DISK_FULL

from . import errors as E
from .errors import WiroError, error_response

log = logging.getLogger("easel.api")


def install(app: FastAPI) -> None:
    """Register the handlers on ``app`` (its services' ``disk`` decides what a full disk is)."""

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
    async def _io_error(request: Request, exc: Exception):
        """A full disk (database or files) answers 507 and the server carries on; else as above."""
        if not request.app.state.services.disk.noticed(exc):
            return await _unexpected(request, exc)
        log.error("%s %s: the disk is full: %s", request.method, request.url.path, exc)
        return error_response(0, DISK_FULL, 507, {"Retry-After": "30"})
