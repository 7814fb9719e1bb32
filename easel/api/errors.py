"""Wiro's error envelope: ``{"result": false, "errors": [{"code": N, "message": "..."}]}``.

HTTP status is 200 for request errors (as Wiro's docs state), 401 for authentication failures
and 404 for unknown endpoints ("Error parsing url."). ``message`` is always one of the texts
Wiro's error reference documents (so a client may compare it); any further explanation Easel
has goes into an extra key of the same error object, ``detail``, which Wiro clients ignore.
"""
from __future__ import annotations

import re

from fastapi.responses import JSONResponse

PARSE_URL = "Error parsing url."
NO_TASK = "There is no task yet."
NO_PERMISSION = "You don't have any permission for this action."
NOT_CANCELLABLE = "Task is not in a cancellable state."
TOOL_NOT_FOUND = "slug-owner-project-not-exist"
TOOL_NOT_ACCESSIBLE = "tool-not-accessible"
INVALID_BODY = "Request parameters are invalid."
TASK_NOT_EXIST = "task-not-exist"
NOT_DELETABLE = "Task must be completed or cancelled before deleting files"
CONCURRENCY = "You have reached your concurrent task limit."

# Documented message templates (error-reference.md): a longer message that starts with one of
# them is answered as the template's text, the rest going to ``detail``.
_DOCUMENTED = [re.compile(p) for p in (
    r"Request parameter \[[^\]]+\] must be integer or float",
    r"Request parameter \[[^\]]+\] must be between \S+ and \S+",
    r"Request parameter \[[^\]]+\] required",
    r"Request files \[[^\]]+\] required",
    re.escape(INVALID_BODY),
    re.escape("Project authorization is not valid."),
    re.escape(CONCURRENCY),
)]


def documented(message: str) -> tuple[str, str]:
    """Split ``message`` into (documented text, extra explanation or "")."""
    for pattern in _DOCUMENTED:
        m = pattern.match(message)
        if m and m.end() < len(message):
            rest = message[m.end():].lstrip(" :.,-").removesuffix(".").strip()
            if rest.startswith("(") and rest.endswith(")") and rest.count("(") == 1:
                rest = rest[1:-1]
            return m.group(0), rest
    return message, ""


class WiroError(Exception):
    """An error answered in Wiro's envelope with ``code``, HTTP ``status`` and an optional ``detail``."""

    def __init__(self, code: int, message: str, status: int = 200, headers: dict | None = None, detail: str = ""):
        if not detail:  # "documented text. explanation" → the documented text, and the rest as detail
            message, detail = documented(message)
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.headers = headers or {}
        self.detail = detail


def error_response(code: int, message: str, status: int = 200, headers: dict | None = None,
                   detail: str = "") -> JSONResponse:
    error = {"code": code, "message": message}
    if detail:
        error["detail"] = detail
    return JSONResponse({"result": False, "errors": [error]}, status_code=status, headers=headers)
