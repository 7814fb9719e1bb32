"""Where the bytes of a file input are: shared by the API (checks before queueing) and the worker.

A file input's value is one of (Wiro's conventions, plus Easel's internal references):

- ``upload:<name>``: a multipart file sent with the Run request (saved under ``uploads/<task uuid>/``);
- ``file:<id>``: a file uploaded with ``POST /v1/File/Upload`` (the API rewrites a bare name to this);
- a bare file name (``"bg-img2.png"``, as the seeds' curl examples send): the calling project's
  most recent file of that name uploaded with ``POST /v1/File/Upload``;
- this server's own file URL (``<public_url>/v1/File/{accesskey}/{name}``, an output or an
  uploaded file): read through the storage, without HTTP;
- any other ``http(s)`` URL: returned as is, for the caller to fetch with the safe fetcher.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from easel.images import ImageInputError

from . import Storage, output_key, upload_key, user_file_key


class InputFiles:
    """Resolves file-input values of one project to local files (or remote URLs)."""

    def __init__(self, store, storage: Storage):
        self.store = store  # easel.store.Store (passed in; storage does not import the store)
        self.storage = storage

    def key(self, project_id: int, field: str, value: str, task_uuid: str) -> str:
        """The storage key of the input's file, or the remote ``http(s)`` URL to fetch.

        Raises:
            ImageInputError: an empty value, an unsafe upload name, an unknown file name or Easel URL.
        """
        value = (value or "").strip()
        if not value:
            raise ImageInputError(field, f"Request parameter [{field}] required: an image URL, the name of a "
                                         "file uploaded with /v1/File/Upload, or a multipart file")
        if value.startswith("upload:"):
            name = value.removeprefix("upload:")
            try:
                return upload_key(task_uuid, name)
            except ValueError:
                raise ImageInputError(field, f"Request parameter [{field}]: uploaded file {name[:80]!r} is missing") from None
        if value.startswith("file:"):
            row = self.store.user_file(project_id, value.removeprefix("file:"))
            if row is None or row.is_folder:
                raise ImageInputError(field, f"Request parameter [{field}]: the uploaded file was deleted")
            return user_file_key(row.path)
        if value.lower().startswith(("http://", "https://")):
            own = self.storage.own_file(value)
            if own is None:
                return value
            out = self.store.output_by_key(*own)
            if out is not None:
                return output_key(out.path)
            row = self.store.user_file_by_key(*own)
            if row is not None:
                return user_file_key(row.path)
            raise ImageInputError(field, f"Request parameter [{field}]: {value} is not a file on this server")
        row = self.store.user_file_by_name(project_id, value)
        if row is None:
            raise ImageInputError(field, f"Request parameter [{field}]: {value!r} is neither an http(s) URL nor the "
                                         "name of a file this project uploaded with /v1/File/Upload")
        return user_file_key(row.path)

    def locate(self, project_id: int, field: str, value: str, task_uuid: str, scratch: Path) -> Path | str:
        """The local path of the input's file, or the remote ``http(s)`` URL to fetch.

        Stored files are read through the storage: in place on local storage, downloaded into
        ``scratch`` (a folder per file, removed with the task's scratch folder) from S3.

        Raises:
            ImageInputError: see :meth:`key`; also a stored file that is gone.
        """
        where = self.key(project_id, field, value, task_uuid)
        if where.lower().startswith(("http://", "https://")):
            return where
        return local_copy(self.storage, where, scratch, field)


def local_copy(storage: Storage, key: str, scratch: Path, field: str) -> Path:
    """A local file with the bytes of ``key`` (``storage.local_path`` into a folder of ``scratch``
    named after the key, so two inputs of the same file name do not collide).

    Raises:
        ImageInputError: naming ``field`` when the file is gone.
    """
    folder = Path(scratch) / hashlib.sha256(key.encode()).hexdigest()[:16]
    try:
        return storage.local_path(key, folder)
    except FileNotFoundError:
        name = key.rsplit("/", 1)[-1]
        if key.startswith("uploads/"):
            raise ImageInputError(field, f"Request parameter [{field}]: uploaded file {name!r} is missing") from None
        raise ImageInputError(field, f"Request parameter [{field}]: the file {name!r} was deleted") from None
