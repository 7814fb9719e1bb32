"""Wiro's Files API (``POST /v1/File/FolderCreate``, ``POST /v1/File/Upload``) and the file route
``GET``/``HEAD /v1/File/{accesskey}/{name}`` that serves outputs, Run uploads and uploaded files
(the access key in the URL is the credential). The work is in :mod:`easel.api.files`."""
from __future__ import annotations

import mimetypes
import re
import uuid as uuidlib

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from easel.storage import output_key, upload_key, user_file_key

from .. import deps
from .. import files as files_api
from ..deps import WiroCall
from ..errors import WiroError
from ..services import Services

router = APIRouter()
_UPLOAD_KEY = re.compile(r"^[0-9a-f]{32}$")


@router.post("/v1/File/FolderCreate", summary="Create a folder for uploaded files (name, parentid)")
async def folder_create(wiro: WiroCall = Depends(deps.wiro)):
    svc, project, body = wiro.svc, wiro.project, wiro.body
    return deps.respond(await deps.call(svc, files_api.folder_create, svc, project, body))


@router.post("/v1/File/Upload", summary="Upload a file (multipart `file`, optional `folderid`) to use in Runs")
async def file_upload(wiro: WiroCall = Depends(deps.wiro)):
    svc, project, body = wiro.svc, wiro.project, wiro.body
    return deps.respond(await deps.call(svc, files_api.upload, svc, project, body))


_FILE_SUMMARY = "An output, an uploaded input or a File/Upload file (the key in the URL is the credential)"


# two routes, each with its own operationId: OpenAPI code generators refuse duplicate ids
@router.head("/v1/File/{accesskey}/{name}", summary=_FILE_SUMMARY, operation_id="file_head")
@router.get("/v1/File/{accesskey}/{name}", summary=_FILE_SUMMARY, operation_id="file_get")
async def file(accesskey: str, name: str, request: Request, svc: Services = Depends(deps.services)):
    found = await run_in_threadpool(file_key, svc, accesskey, name)
    if found is None:
        raise WiroError(1, "There is no file.", 404)
    return await files_api.serve(svc.storage, *found, head=request.method == "HEAD")


def file_key(svc: Services, accesskey: str, name: str) -> tuple[str, str] | None:
    """``(storage key, content type)`` of the file served at ``/v1/File/{accesskey}/{name}``:
    an output (the task's file access key), a ``File/Upload`` file (its access key) or a
    Run's upload (the task's uuid without dashes, as shown in its ``parameters``); None if
    there is none (an unsafe name included)."""
    try:
        out = svc.store.output_by_key(accesskey, name)
        if out is not None:
            return output_key(out.path), out.contenttype
        up = svc.store.user_file_by_key(accesskey, name)
        if up is not None:
            return user_file_key(up.path), up.contenttype
        if _UPLOAD_KEY.match(accesskey):
            return upload_key(str(uuidlib.UUID(accesskey)), name), \
                mimetypes.guess_type(name)[0] or "application/octet-stream"
    except ValueError:  # not a storage key: nothing Easel stored
        pass
    return None
