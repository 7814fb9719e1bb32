"""Wiro request bodies as real clients send them — every quirk handled here and nowhere else.

Accepted: ``application/json``; real ``multipart/form-data`` (files and text fields; repeated
fields and ``name[]`` become lists); ``application/x-www-form-urlencoded``; and a JSON object sent
under a multipart or form content type with no real form encoding (the seeds' curl examples do
``-H "Content-Type: multipart/form-data" -d '{...}'``), or with no content type at all. A UTF-8
byte-order mark before a JSON body (Windows tools write one) is ignored.

Bodies are read as a stream and refused (HTTP 413) as soon as they pass their cap: a body without
files (JSON, URL-encoded) at ``EASEL_BODY_MAX_BYTES``, a multipart body at
``EASEL_REQUEST_MAX_BYTES``; each multipart text part at :data:`MAX_TEXT_PART`. File parts are
spooled to disk by Starlette's parser, never held whole in memory before their size is checked.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from easel import strict

from .errors import INVALID_BODY, WiroError

MAX_DEPTH = 32  # JSON nesting levels a request body may have (Wiro's bodies use 2)
MAX_TEXT_PART = 64 * 1024  # bytes of one text part of a multipart body (every field's cap is far below)
MAX_FIELDS = 256  # text parts of one multipart body


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
    bad = strict.unstorable_number_field(data)
    if bad is not None:
        raise WiroError(0, INVALID_BODY, detail=f"Request parameter [{bad}] is a number this server cannot store: "
                                                f"integers must be between -2^63 and 2^63-1 and numbers finite "
                                                f"(NaN and Infinity are not JSON). Send it as a string.")
    return data


class _Capped:
    """The request's body messages, counted and refused (HTTP 413) as soon as they pass ``limit``
    bytes; ``peeked`` holds the chunks read so far, replayed first to a parser (:meth:`receive`)."""

    def __init__(self, request: Request, limit: int, setting: str):
        self.request, self.limit, self.setting = request, limit, setting
        self.total, self.done = 0, False
        self.peeked: list[bytes] = []

    def too_big(self) -> WiroError:  # built only when raised: a WiroError matches its message against the docs'
        return WiroError(0, f"{INVALID_BODY} The request body is larger than this server's limit of {self.limit} "
                            f"bytes ({self.setting}).", 413)

    async def chunk(self) -> bytes:
        """The next chunk of the body (b"" at its end)."""
        while not self.done:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            body = message.get("body", b"")
            self.done = not message.get("more_body", False)
            self.total += len(body)
            if self.total > self.limit:
                raise self.too_big()
            if body:
                return body
        return b""

    async def receive(self) -> dict:
        """An ASGI ``receive`` for a parser: the peeked chunks, then the rest of the body, capped."""
        if self.peeked:
            return {"type": "http.request", "body": self.peeked.pop(0), "more_body": True}
        body = await self.chunk()
        return {"type": "http.request", "body": body, "more_body": not self.done}

    async def rest(self, limit: int, setting: str) -> bytes:
        """The peeked chunks and the rest of the body, now capped at ``limit`` bytes in all."""
        self.limit, self.setting = limit, setting
        if self.total > limit:
            raise self.too_big()
        chunks = self.peeked
        self.peeked = []
        while chunk := await self.chunk():
            chunks.append(chunk)
        return b"".join(chunks)


def _declared_over(request: Request, limit: int) -> bool:
    declared = request.headers.get("content-length", "")
    return declared.isascii() and declared.isdigit() and len(declared) < 20 and int(declared) > limit


async def read_capped(request: Request, max_bytes: int, setting: str = "EASEL_BODY_MAX_BYTES") -> bytes:
    """The whole request body as bytes, streamed and refused (HTTP 413, naming ``setting``) as soon as
    it passes ``max_bytes`` (or when ``Content-Length`` already says so): an oversized body is never
    buffered whole. For endpoints that parse the bytes themselves (the OpenAI Images API's JSON).

    Raises:
        WiroError: HTTP 413 for a body over ``max_bytes``.
    """
    body = _Capped(request, max_bytes, setting)
    if _declared_over(request, max_bytes):
        raise body.too_big()
    raw = await body.rest(max_bytes, setting)
    request._body = raw  # request.form() and request.json() read these bytes, not the consumed stream
    return raw


async def parse_body(request: Request, max_file_bytes: int, max_body_bytes: int | None = None,
                     max_text_bytes: int | None = None) -> Body:
    """Parse any accepted body into fields and uploaded files, streaming it: a refused body is
    never held whole in memory.

    Args:
        max_file_bytes: Largest uploaded file (``EASEL_UPLOAD_MAX_BYTES``).
        max_body_bytes: Largest multipart body, files included (``EASEL_REQUEST_MAX_BYTES``).
        max_text_bytes: Largest body without files: JSON (also sent under a multipart content
            type, as the seeds do) or URL-encoded (``EASEL_BODY_MAX_BYTES``). Each text part of a
            multipart body is capped at :data:`MAX_TEXT_PART` bytes, and a multipart body has at
            most :data:`MAX_FIELDS` text parts; file parts are spooled to disk as they stream.

    Raises:
        WiroError: code 0 "Request parameters are invalid." with the reason (no body, not JSON,
            nested deeper than :data:`MAX_DEPTH`, a lone surrogate, a number out of range, a
            text part over its cap), a file over the cap, or HTTP 413 for a body over its cap.
    """
    max_body_bytes = max_body_bytes or 2**62
    max_text_bytes = min(max_text_bytes or max_body_bytes, max_body_bytes)
    ctype = request.headers.get("content-type", "").lower()
    multipart = ctype.startswith("multipart/form-data")
    limit, setting = (max_body_bytes, "EASEL_REQUEST_MAX_BYTES") if multipart else \
        (max_text_bytes, "EASEL_BODY_MAX_BYTES")
    body = _Capped(request, limit, setting)
    if _declared_over(request, limit):
        raise body.too_big()
    # the first bytes that are not a byte-order mark or white space tell JSON from a form
    head = b""
    while not head.removeprefix(BOM).strip() and (chunk := await body.chunk()):
        body.peeked.append(chunk)
        head += chunk
    head = head.removeprefix(BOM).lstrip()
    if not head:
        raise WiroError(0, f"{INVALID_BODY} The request has no body: send a JSON object ({{}} when there are no "
                           "parameters) or multipart/form-data.")
    if "json" in ctype or _looks_json(head):
        raw = await body.rest(max_text_bytes, "EASEL_BODY_MAX_BYTES")
        request._body = raw
        return Body(fields=_json(raw.removeprefix(BOM)))
    if multipart or ctype.startswith("application/x-www-form-urlencoded"):
        return await _form(Request(request.scope, body.receive), max_file_bytes)
    raise WiroError(0, INVALID_BODY, detail="Send application/json or multipart/form-data.")


async def _form(request: Request, max_file_bytes: int) -> Body:
    """A multipart or URL-encoded body (``request`` reads the capped stream)."""
    try:
        form = await request.form(max_part_size=MAX_TEXT_PART, max_fields=MAX_FIELDS)
    except (WiroError, ClientDisconnect):
        raise
    except Exception as exc:
        detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or str(exc)
        if "maximum size" in str(detail):
            detail = f"a text field is larger than this server's limit of {MAX_TEXT_PART} bytes per field"
        raise WiroError(0, INVALID_BODY, detail=f"The form body could not be parsed: {detail}") from None
    body = Body()
    try:
        for key, value in form.multi_items():
            name = key[:-2] if key.endswith("[]") else key
            if isinstance(value, UploadFile):
                if (value.size or 0) > max_file_bytes:  # on disk: refused without reading it
                    raise WiroError(0, f"Request files [{name}] must be at most {max_file_bytes} bytes")
                data = await value.read()
                if data or value.filename:
                    body.files.append(Upload(name, value.filename or name, data))
                continue
            if name in body.fields:
                prev = body.fields[name]
                body.fields[name] = (prev if isinstance(prev, list) else [prev]) + [value]
            else:
                body.fields[name] = [value] if key.endswith("[]") else value
    finally:
        await form.close()
    return body
