"""Where the bytes of a file input are: shared by the API (checks before queueing) and the worker.

A file input's value is one of (Wiro's conventions, plus Easel's internal references):

- ``upload:<name>``: a multipart file sent with the Run request (saved under ``uploads/<task uuid>/``);
- ``file:<id>``: a file uploaded with ``POST /v1/File/Upload`` (the API rewrites a bare name to this);
- a bare file name (``"bg-img2.png"``, as the seeds' curl examples send): the calling project's
  most recent file of that name uploaded with ``POST /v1/File/Upload``;
- this server's own file URL (``<public_url>/v1/File/{accesskey}/{name}``, an output or an
  uploaded file): resolved locally, without HTTP;
- any other ``http(s)`` URL: returned as is, for the caller to fetch with the safe fetcher.
"""
from __future__ import annotations

from pathlib import Path

from easel.config import Settings
from easel.images import ImageInputError

from . import LocalStorage


class InputFiles:
    """Resolves file-input values of one project to local paths (or remote URLs)."""

    def __init__(self, settings: Settings, store, storage: LocalStorage):
        self.settings = settings
        self.store = store  # easel.store.Store (passed in; storage does not import the store)
        self.storage = storage

    def locate(self, project_id: int, field: str, value: str, uploads_dir: Path) -> Path | str:
        """The local path of the input's file, or the remote ``http(s)`` URL to fetch.

        Raises:
            ImageInputError: an empty value, a missing upload, an unknown file name or Easel URL.
        """
        value = (value or "").strip()
        if not value:
            raise ImageInputError(field, f"Request parameter [{field}] required: an image URL, the name of a "
                                         "file uploaded with /v1/File/Upload, or a multipart file")
        if value.startswith("upload:"):
            name = value.removeprefix("upload:")
            path = (uploads_dir / name).resolve()
            if path.parent != uploads_dir.resolve() or not path.is_file():
                raise ImageInputError(field, f"Request parameter [{field}]: uploaded file {name!r} is missing")
            return path
        if value.startswith("file:"):
            row = self.store.user_file(project_id, value.removeprefix("file:"))
            if row is None or row.is_folder:
                raise ImageInputError(field, f"Request parameter [{field}]: the uploaded file was deleted")
            return self.user_path(row.path)
        if value.lower().startswith(("http://", "https://")):
            own = self.storage.own_file(value)
            if own is None:
                return value
            out = self.store.output_by_key(*own)
            if out is not None:
                return self.storage.path(out.path)
            row = self.store.user_file_by_key(*own)
            if row is not None:
                return self.user_path(row.path)
            raise ImageInputError(field, f"Request parameter [{field}]: {value} is not a file on this server")
        row = self.store.user_file_by_name(project_id, value)
        if row is None:
            raise ImageInputError(field, f"Request parameter [{field}]: {value!r} is neither an http(s) URL nor the "
                                         "name of a file this project uploaded with /v1/File/Upload")
        return self.user_path(row.path)

    def user_path(self, relative: str) -> Path:
        """Absolute path of an uploaded file; refuses anything outside ``Settings.user_files_dir``."""
        root = self.settings.user_files_dir.resolve()
        path = (root / relative).resolve()
        if root not in path.parents:
            raise FileNotFoundError(relative)
        return path
