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

from .errors import INVALID_BODY, WiroError


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
    except (UnicodeDecodeError, ValueError):
        raise WiroError(0, INVALID_BODY, detail="The body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise WiroError(0, INVALID_BODY, detail="The JSON body must be an object.")
    return data


async def parse_body(request: Request, max_file_bytes: int) -> Body:
    """Parse any accepted body into fields and uploaded files.

    Raises:
        WiroError: code 0 "Request parameters are invalid." with the reason, or a file over the cap.
    """
    raw = await request.body()
    if raw.startswith(BOM):
        raw = raw[len(BOM):]
    ctype = request.headers.get("content-type", "").lower()
    if not raw.strip():
        return Body()
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
