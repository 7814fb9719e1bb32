"""Wiro request bodies as real clients send them — every quirk handled here and nowhere else.

Accepted: ``application/json``; real ``multipart/form-data`` (files and text fields; repeated
fields and ``name[]`` become lists); ``application/x-www-form-urlencoded``; and a JSON object sent
under a multipart or form content type with no real form encoding (the seeds' curl examples do
``-H "Content-Type: multipart/form-data" -d '{...}'``), or with no content type at all. A UTF-8
byte-order mark before a JSON body (Windows tools write one) is ignored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from easel import strict

from .errors import INVALID_BODY, WiroError

MAX_DEPTH = 32  # JSON nesting levels a request body may have (Wiro's bodies use 2)


@dataclass
class Upload:
    field: str
    filename: str
    data: bytes


@dataclass
class Body:
    fields: dict[str, Any] = field(default_factory=dict)
    files: list[Upload] = field(default_factory=list)


BOM = b"\xef\xbb\xbf"


def _looks_json(raw: bytes) -> bool:
    return raw.lstrip()[:1] in (b"{",)


def _json(raw: bytes) -> dict:
    try:
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        data = None  # nested beyond what the parser takes: refused below
    except (UnicodeDecodeError, ValueError):
        raise WiroError(0, INVALID_BODY, detail="The body is not valid JSON.") from None
    if data is None or strict.depth(data) > MAX_DEPTH:
        raise WiroError(0, INVALID_BODY, detail=f"The JSON body is nested more than {MAX_DEPTH} levels deep.")
    if not isinstance(data, dict):
        raise WiroError(0, INVALID_BODY, detail="The JSON body must be an object.")
    bad = strict.lone_surrogate_field(data)
    if bad is not None:
        raise WiroError(0, INVALID_BODY, detail=f"Request parameter [{bad}] is not valid Unicode text: it contains a "
                                                "lone surrogate (an unpaired \\ud800-\\udfff escape). Send UTF-8 text.")
    return data


async def read_capped(request: Request, max_bytes: int) -> bytes:
    """The request body, read as a stream and refused (HTTP 413) as soon as it passes ``max_bytes``
    (or when ``Content-Length`` already says so), so an oversized body is never buffered whole."""
    def too_big() -> WiroError:  # built only when raised: a WiroError matches its message against the docs'
        return WiroError(0, f"{INVALID_BODY} The request body is larger than this server's limit of {max_bytes} "
                            "bytes (EASEL_REQUEST_MAX_BYTES).", 413)

    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and len(declared) < 20 and int(declared) > max_bytes:
        raise too_big()
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise too_big()
        chunks.append(chunk)
    raw = b"".join(chunks)
    request._body = raw  # request.form() parses these bytes, not the consumed stream
    return raw


async def parse_body(request: Request, max_file_bytes: int, max_body_bytes: int | None = None) -> Body:
    """Parse any accepted body into fields and uploaded files.

    Raises:
        WiroError: code 0 "Request parameters are invalid." with the reason (no body, not JSON,
            nested deeper than :data:`MAX_DEPTH`, a lone surrogate), a file over the cap, or
            HTTP 413 for a body over ``max_body_bytes``.
    """
    raw = await read_capped(request, max_body_bytes) if max_body_bytes else await request.body()
    if raw.startswith(BOM):
        raw = raw[len(BOM):]
    ctype = request.headers.get("content-type", "").lower()
    if not raw.strip():
        raise WiroError(0, f"{INVALID_BODY} The request has no body: send a JSON object ({{}} when there are no "
                           "parameters) or multipart/form-data.")
    if "json" in ctype or _looks_json(raw):
        return Body(fields=_json(raw))
    if ctype.startswith("multipart/form-data") or ctype.startswith("application/x-www-form-urlencoded"):
        try:
            form = await request.form(max_part_size=max_file_bytes)
        except Exception as exc:
            raise WiroError(0, INVALID_BODY, detail=f"The form body could not be parsed: {exc}") from None
        body = Body()
        for key, value in form.multi_items():
            name = key[:-2] if key.endswith("[]") else key
            if isinstance(value, UploadFile):
                data = await value.read()
                if len(data) > max_file_bytes:
                    raise WiroError(0, f"Request files [{name}] must be at most {max_file_bytes} bytes")
                if data or value.filename:
                    body.files.append(Upload(name, value.filename or name, data))
                continue
            if name in body.fields:
                prev = body.fields[name]
                body.fields[name] = (prev if isinstance(prev, list) else [prev]) + [value]
            else:
                body.fields[name] = [value] if key.endswith("[]") else value
        return body
    raise WiroError(0, INVALID_BODY, detail="Send application/json or multipart/form-data.")
