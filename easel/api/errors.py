"""Wiro's error envelope: ``{"result": false, "errors": [{"code": N, "message": "..."}]}``.

HTTP status is 200 for request errors (as Wiro's docs state), 401 for authentication failures
and 404 for unknown endpoints ("Error parsing url.").
"""
from __future__ import annotations

from fastapi.responses import JSONResponse

PARSE_URL = "Error parsing url."
NO_TASK = "There is no task yet."
NO_PERMISSION = "You don't have any permission for this action."
NOT_CANCELLABLE = "Task is not in a cancellable state."
TOOL_NOT_FOUND = "slug-owner-project-not-exist"
TOOL_NOT_ACCESSIBLE = "tool-not-accessible"
INVALID_BODY = "Request parameters are invalid."
NOT_DELETABLE = ("Task has not ended: its inputs and outputs can be deleted once it reaches "
                 "task_postprocess_end or task_cancel.")


class WiroError(Exception):
    """An error answered in Wiro's envelope with ``code`` and HTTP ``status``."""

    def __init__(self, code: int, message: str, status: int = 200, headers: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.headers = headers or {}


def error_response(code: int, message: str, status: int = 200, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"result": False, "errors": [{"code": code, "message": message}]}, status_code=status,
                        headers=headers)
