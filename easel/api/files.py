"""Wiro's Files API (``POST /v1/File/FolderCreate``, ``POST /v1/File/Upload``, see Wiro's
``files.md``) and the checks of image inputs made before a Run is queued.

Files belong to the project that uploaded them. Each is stored under the storage key
``userfiles/<file id>/<name>`` (``easel.storage``: ``<data_dir>/userfiles/...`` or the bucket) and
served at ``/v1/File/{accesskey}/{name}`` (the same route as outputs; the access key is the
credential). A Run references a file by that URL, or by
its bare name, as the seeds' curl examples do (``"inputImageUrl": "bg-img2.png"``): the project's
most recent file of that name. ZIP archives are stored as they are (Wiro extracts them; Easel does
not yet).
"""
from __future__ import annotations

import mimetypes
import re
import secrets
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from easel.catalog import ToolSpec
from easel.images import ImageInputError, probe
from easel.storage import Storage, user_file_key
from easel.storage.inputs import InputFiles
from easel.store import Project, UserFile

from .errors import WiroError
from .parsing import Body

if TYPE_CHECKING:
    from .services import Services

EXTENSIONS = ("jpg", "jpeg", "png", "gif", "webp", "heic", "mp4", "webm", "mov", "mp3", "wav", "m4a", "pdf", "csv",
              "docx", "xlsx", "pptx", "txt", "md", "epub", "zip")
_FOLDER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(filename: str) -> str:
    """A file name safe on disk and in URLs: base name only, other characters → ``_``, ≤ 200 chars."""
    name = _UNSAFE.sub("_", Path(filename.replace("\\", "/")).name).strip("._")[:200]
    return name or "file"


def file_object(svc: Services, row: UserFile) -> dict:
    """Wiro's ``list`` entry for a folder or file."""
    obj = {"id": row.id, "name": row.name, "contenttype": row.contenttype, "size": str(row.size),
           "parentid": row.parent_id, "addedtime": str(int(row.addedtime))}
    if not row.is_folder:
        obj["url"] = svc.storage.url(row.accesskey, row.name)
        obj["accesskey"] = row.accesskey
    return obj


def _folder(svc: Services, project: Project, folder_id: str, field: str) -> UserFile:
    if not folder_id:
        return svc.store.root_folder(project.id)
    row = svc.store.user_file(project.id, folder_id)
    if row is None or not row.is_folder:
        raise WiroError(0, f"Request parameter [{field}] is not a folder of this project (got {folder_id!r})")
    return row


def folder_create(svc: Services, project: Project, body: Body) -> dict:
    """``POST /v1/File/FolderCreate``: ``name`` (letters, digits, ``-``, ``_``), optional ``parentid``."""
    name = str(body.fields.get("name", "") or "").strip()
    if not _FOLDER_NAME.match(name):
        raise WiroError(0, "Request parameter [name] required: 1 to 100 letters, numbers, hyphens or underscores")
    parent = _folder(svc, project, str(body.fields.get("parentid", "") or "").strip(), "parentid")
    row = svc.store.add_user_file(project_id=project.id, parent_id=parent.id, is_folder=True, name=name,
                                  contenttype="", size=0, path="")
    return {"result": True, "errors": [], "list": [file_object(svc, row)]}


def upload(svc: Services, project: Project, body: Body) -> dict:
    """``POST /v1/File/Upload``: multipart ``file`` (one or more), optional ``folderid``.

    The size cap is ``Settings.fetch.upload_max_bytes`` (enforced while parsing); the type is checked
    against Wiro's list of supported extensions.
    """
    files = [f for f in body.files if f.field == "file"]
    if not files:
        raise WiroError(0, "Request parameter [file] required: send the file as multipart/form-data field 'file'")
    parent = _folder(svc, project, str(body.fields.get("folderid", "") or "").strip(), "folderid")
    rows = []
    for up in files:
        name = safe_name(up.filename or "file")
        ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
        if ext not in EXTENSIONS:
            raise WiroError(0, f"Request parameter [file]: {name!r} is not a supported file type "
                               f"(accepted: {', '.join(EXTENSIONS)})")
        rows.append((name, up.data))
    answer = []
    for name, data in rows:
        file_id = secrets.token_hex(16)
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        try:  # the bytes first: a row never points at a missing file
            svc.storage.put_bytes(user_file_key(f"{file_id}/{name}"), data, content_type=ctype)
        except OSError:
            raise WiroError(0, "The server could not store the uploaded file; try again later.", 503) from None
        row = svc.store.add_user_file(id=file_id, project_id=project.id, parent_id=parent.id, is_folder=False,
                                      name=name, size=len(data), path=f"{file_id}/{name}",
                                      contenttype=ctype)
        answer.append(file_object(svc, row))
    return {"result": True, "errors": [], "list": answer}


def check_image_inputs(svc: Services, project: Project, spec: ToolSpec, inputs: dict, task_uuid: str) -> None:
    """Before queueing: check every image input whose bytes are already on this server.

    Multipart files, files uploaded with ``/v1/File/Upload`` (a bare name is rewritten to
    ``file:<id>`` in ``inputs``, so a later upload of the same name does not change the task) and
    this server's own file URLs are probed from their headers (type, pixel limit, decompression
    bombs). Other URLs are fetched and checked by the worker.

    Raises:
        WiroError: code 0, naming the field.
    """
    given = [(i, value) for i in spec.inputs if i.accepts == "image"
             and (value := str(inputs.get(i.name, "") or "").strip())]
    if not given:  # most Runs (text-to-image): no scratch folder, no storage look-up
        return
    locator = InputFiles(svc.store, svc.storage)
    with tempfile.TemporaryDirectory(prefix="easel-check-") as scratch:  # stored files read from S3 land here
        for i, value in given:
            try:
                where = locator.locate(project.id, i.name, value, task_uuid, Path(scratch))
                if isinstance(where, str):
                    continue  # a remote URL: the worker fetches it
                probe(where, i.name, svc.settings.fetch.max_image_pixels)
            except ImageInputError as exc:
                raise WiroError(0, exc.message) from None
            except OSError:
                raise WiroError(0, f"Request parameter [{i.name}]: the server could not read the file; try "
                                   "again later.", 503) from None
            if not value.lower().startswith(("http://", "https://", "upload:", "file:")):
                inputs[i.name] = f"file:{svc.store.user_file_by_name(project.id, value).id}"


CHUNK = 256 * 1024


async def serve(storage: Storage, key: str, media_type: str, head: bool = False) -> Response:
    """The HTTP answer of ``GET``/``HEAD /v1/File/{accesskey}/{name}`` for the stored file ``key``:
    streamed from the storage in chunks (from disk, or from S3 without a local copy), with its
    ``Content-Length``; a file gone from the storage is Wiro's "There is no file." (404).

    Raises:
        WiroError: 404 when the file is gone, 503 when the storage fails.
    """
    try:
        if head:
            stat = await run_in_threadpool(storage.stat, key)
            if stat is None:
                raise FileNotFoundError(key)
            return Response(status_code=200, media_type=media_type, headers={"Content-Length": str(stat.size)})
        stream, size = await run_in_threadpool(storage.open, key)
    except FileNotFoundError:
        raise WiroError(1, "There is no file.", 404) from None
    except OSError:
        raise WiroError(0, "The server could not read the file; try again later.", 503) from None
    return StreamingResponse(_chunks(stream), media_type=media_type, headers={"Content-Length": str(size)})


def _chunks(stream: BinaryIO):
    try:
        while block := stream.read(CHUNK):
            yield block
    finally:
        stream.close()
