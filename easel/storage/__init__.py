"""Where Easel keeps files: task outputs, Run uploads, ``File/Upload`` files and fetched LoRAs.

One interface, :class:`Storage`, two backends chosen by ``Settings.storage.storage`` (``EASEL_STORAGE``)
through :func:`create_storage`:

- :class:`LocalStorage` (``local``, the default): files under the data directory, as a single box
  keeps them.
- :class:`easel.storage.s3.S3Storage` (``s3://bucket/prefix``): objects in S3-compatible storage
  with boto3, shared by every API process and worker of a fleet.

Every file has a **key**, a relative ``/``-separated name whose first segment is its area
(the local path is under the data directory):

- ``files/<task uuid>/<name>``: a task's output (``files/``);
- ``uploads/<task uuid>/<name>``: a file sent with a Run as multipart (``uploads/``);
- ``userfiles/<file id>/<name>``: a file sent with ``POST /v1/File/Upload`` (``userfiles/``);
- ``fetched/<sha256>.safetensors``: a LoRA fetched from a user URL, and
  ``fetched/urls/<sha256 of the URL>``: the name of the file that URL gave (``models/fetched/``).

Keys are checked by :func:`check_key` before any use: names are hostile, and no key may reach
outside its area (no ``..``, no absolute or empty segments, no hidden names, only
``[A-Za-z0-9._-]``). Files are served at ``/v1/File/{accesskey}/{name}`` (the key in the URL is
the credential) or, with S3 and ``EASEL_OUTPUT_URLS=presigned``, at presigned S3 URLs.
"""
from __future__ import annotations

import errno
import mimetypes
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple
from urllib.parse import unquote

from easel.config import Settings

AREAS = ("files", "uploads", "userfiles", "fetched")
_SEGMENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}$")
MAX_KEY_LENGTH = 900  # S3 allows 1024 bytes with the prefix; a prefix is at most 120


class StoredObject(NamedTuple):
    """One stored file: its key, size in bytes and last modification (epoch seconds)."""

    key: str
    size: int
    mtime: float


def check_key(key: str, prefix: bool = False) -> str:
    """``key`` if it is a safe storage key, else :class:`ValueError` naming the problem.

    A key is ``area/segment[/segment...]`` with ``area`` in :data:`AREAS` and every segment made of
    ``A-Z a-z 0-9 . _ -`` (at most 255 characters, not starting with ``.``): no ``..``, no empty,
    absolute or hidden segment, no backslash, at most :data:`MAX_KEY_LENGTH` characters. With
    ``prefix`` the key may end with ``/`` (a folder: ``uploads/<uuid>/``) or be an area alone.

    Raises:
        ValueError: the key is not safe (the message says why, without echoing more than 80 chars).
    """
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"storage key must be 1 to {MAX_KEY_LENGTH} characters")
    body = key[:-1] if prefix and key.endswith("/") else key
    parts = body.split("/")
    if parts[0] not in AREAS:
        raise ValueError(f"storage key must start with one of {', '.join(AREAS)} (got {key[:80]!r})")
    if len(parts) < (1 if prefix else 2) or not all(_SEGMENT.match(p) for p in parts[1:]):
        raise ValueError(f"storage key {key[:80]!r} has an unsafe or empty segment")
    return key


def _is_key(key: str) -> bool:
    try:
        check_key(key)
    except ValueError:
        return False
    return True


def output_key(relative: str) -> str:
    """Key of an output from its ``Output.path`` (``<task uuid>/<name>``)."""
    return check_key(f"files/{relative}")


def upload_key(task_uuid: str, name: str) -> str:
    """Key of a Run's multipart file ``name`` of task ``task_uuid``."""
    return check_key(f"uploads/{task_uuid}/{name}")


def user_file_key(relative: str) -> str:
    """Key of a ``File/Upload`` file from its ``UserFile.path`` (``<file id>/<name>``)."""
    return check_key(f"userfiles/{relative}")


def content_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


class Storage(ABC):
    """The files of one deployment: put, read, list and delete by key (see the module doc).

    Writes are all or nothing: a reader sees the whole new file or nothing (a local rename, an
    S3 PUT or completed multipart upload). Reading methods raise :class:`FileNotFoundError` for a
    missing key; deleting a missing key is not an error. Every method raises :class:`ValueError`
    for an unsafe key (:func:`check_key`) and :class:`OSError` when the backend fails.
    """

    kind = "abstract"
    #: files written here are visible to other machines (workers need no shared disk)
    shared = False

    def __init__(self, settings: Settings):
        """Keeps only what it reads of ``settings``: the public URL (``settings.core``); a backend
        keeps its own part (``settings.storage``, the data paths)."""
        self.public_url = settings.core.public_url

    # -- the backend's primitives ------------------------------------------------------------

    @abstractmethod
    def put(self, key: str, src: Path, move: bool = False, content_type: str | None = None) -> int:
        """Store the local file ``src`` under ``key``; return its size in bytes.

        ``move``: ``src`` is consumed (renamed into place locally, removed after the upload).
        ``src`` may already be the local file of ``key`` (a no-op for :class:`LocalStorage`).
        """

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Store ``data`` under ``key``."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The whole content of a (small) stored file."""

    @abstractmethod
    def stat(self, key: str) -> StoredObject | None:
        """Size and modification time of ``key``, or None when it does not exist."""

    @abstractmethod
    def open(self, key: str) -> tuple[BinaryIO, int]:
        """A readable binary stream of ``key`` and its size; the caller closes the stream."""

    @abstractmethod
    def local_path(self, key: str, into: Path) -> Path:
        """A local file holding the bytes of ``key``, for code that needs a path (image decoding,
        weight loading). Local storage returns its own file; S3 downloads into
        ``into/<last segment of key>`` (reused when already there: give a folder per key, or
        content-addressed names). The caller must not modify the file."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` (nothing happens if it does not exist)."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Remove every file under ``prefix`` (a folder key ending with ``/``); return how many."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[StoredObject]:
        """Every stored file under ``prefix`` (a folder key ending with ``/``), in no set order."""

    @abstractmethod
    def touch(self, key: str) -> None:
        """Set the modification time of ``key`` to now (retention counts from it)."""

    def check(self) -> None:
        """Raise :class:`OSError` with the reason when the storage cannot be used (checked at start)."""

    # -- shared behaviour ----------------------------------------------------------------------

    def folders(self, area: str) -> Iterator[tuple[str, float]]:
        """``(name, newest mtime)`` of each first-level folder of ``area`` (a task's uploads or
        outputs: ``uploads/<task uuid>/``), for the retention sweeper."""
        newest: dict[str, float] = {}
        for obj in self.list(check_key(f"{area}/", prefix=True)):
            name = obj.key.split("/")[1]
            newest[name] = max(newest.get(name, 0.0), obj.mtime)
        yield from newest.items()

    def save(self, task_uuid: str, src: Path) -> dict:
        """Move the tool's output ``src`` to ``files/<task_uuid>/<src.name>``; return the output
        record fields (``name``, ``contenttype``, ``size``, ``path`` relative to ``files/``).

        Raises:
            OSError: the file could not be stored (nothing was left behind).
            ValueError: an unsafe file name.
        """
        relative = f"{task_uuid}/{src.name}"
        ctype = content_type(src.name)
        size = self.put(output_key(relative), src, move=True, content_type=ctype)
        return {"name": src.name, "contenttype": ctype, "size": size, "path": relative}

    def discard(self, task_uuid: str, saved: list[dict]) -> None:
        """Remove outputs stored by :meth:`save` (a task that did not complete keeps none)."""
        for record in saved:
            self.delete(output_key(record["path"]))

    def url(self, accesskey: str, name: str, key: str | None = None, base_url: str | None = None) -> str:
        """The URL a client fetches a file at: ``<public_url>/v1/File/{accesskey}/{name}`` (served
        by the API, the access key is the credential). With S3 and presigned URLs chosen, a
        presigned URL of ``key`` instead when the key is given."""
        return f"{(base_url or self.public_url).rstrip('/')}/v1/File/{accesskey}/{name}"

    def own_file(self, url: str) -> tuple[str, str] | None:
        """``(accesskey, name)`` when ``url`` is one of this server's file URLs (an output or an
        uploaded file, ``<public_url>/v1/File/{accesskey}/{name}``), else None."""
        prefix = f"{self.public_url.rstrip('/')}/v1/File/"
        if not url.startswith(prefix):
            return None
        parts = url[len(prefix):].split("?", 1)[0].split("#", 1)[0].split("/")
        if len(parts) != 2 or not all(parts):
            return None
        return parts[0], unquote(parts[1])


class LocalStorage(Storage):
    """Files under the data directory: ``files/``, ``uploads/``, ``userfiles/``, ``models/fetched/``."""

    kind = "local"
    shared = False

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.areas = {"files": settings.core.files_dir, "uploads": settings.core.uploads_dir,
                      "userfiles": settings.core.user_files_dir, "fetched": settings.core.models_dir / "fetched"}

    def _path(self, key: str, prefix: bool = False) -> Path:
        check_key(key, prefix)
        area, _, rest = key.partition("/")
        base = self.areas[area]
        path = base.joinpath(*[p for p in rest.split("/") if p])
        if path != base and base not in path.parents:  # check_key makes this impossible; keep the guard
            raise ValueError(f"storage key {key[:80]!r} leaves its area")
        return path

    def put(self, key: str, src: Path, move: bool = False, content_type: str | None = None) -> int:
        dest = self._path(key)
        if Path(src).resolve() == dest.resolve():
            return dest.stat().st_size
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.part"
        try:
            if move:
                try:
                    os.replace(src, dest)
                    return dest.stat().st_size
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
            if move:
                Path(src).unlink(missing_ok=True)
        finally:
            tmp.unlink(missing_ok=True)
        return dest.stat().st_size

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, dest)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def get_bytes(self, key: str) -> bytes:
        return self._file(key).read_bytes()

    def stat(self, key: str) -> StoredObject | None:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return StoredObject(key, st.st_size, st.st_mtime)

    def open(self, key: str) -> tuple[BinaryIO, int]:
        fh = open(self._file(key), "rb")
        return fh, os.fstat(fh.fileno()).st_size

    def local_path(self, key: str, into: Path) -> Path:
        return self._file(key)

    def _file(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        return path

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        base = self.areas[key.split("/")[0]]
        for parent in path.parents:  # the task's folder goes too once it is empty
            if parent == base or base not in parent.parents:
                break
            try:
                parent.rmdir()
            except OSError:
                break

    def delete_prefix(self, prefix: str) -> int:
        folder = self._path(prefix, prefix=True)
        if folder in self.areas.values():
            raise ValueError("delete_prefix: refusing to empty a whole area")
        count = sum(1 for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0
        shutil.rmtree(folder, ignore_errors=True)
        return count

    def list(self, prefix: str) -> Iterator[StoredObject]:
        folder = self._path(prefix, prefix=True)
        area = prefix.split("/")[0]
        base = self.areas[area]
        for path in (folder.rglob("*") if folder.is_dir() else ()):
            try:
                st = path.stat()
            except OSError:
                continue
            key = f"{area}/{path.relative_to(base).as_posix()}"
            if path.is_file() and _is_key(key):  # hidden temporary files of a write in progress are not
                yield StoredObject(key, st.st_size, st.st_mtime)

    def folders(self, area: str) -> Iterator[tuple[str, float]]:
        """Also empty folders (a Run whose upload was interrupted), with the folder's own mtime."""
        base = self._path(f"{area}/", prefix=True)
        try:
            children = list(base.iterdir())
        except OSError:
            return
        for path in children:
            if not path.is_dir():
                continue
            newest = 0.0
            for p in (path, *path.rglob("*")):
                try:
                    newest = max(newest, p.stat().st_mtime)
                except OSError:
                    pass
            yield path.name, newest

    def touch(self, key: str) -> None:
        try:
            os.utime(self._path(key))
        except FileNotFoundError:
            pass


def create_storage(settings: Settings) -> Storage:
    """The storage ``settings.storage.storage`` names: ``local`` (default) or ``s3://bucket/prefix``.

    Raises:
        ValueError: an unknown ``storage`` value (checked by ``Settings`` already).
    """
    if settings.storage.storage.startswith("s3://"):
        from .s3 import S3Storage

        return S3Storage(settings)
    if settings.storage.storage in ("", "local"):
        return LocalStorage(settings)
    raise ValueError(f"EASEL_STORAGE must be 'local' or 's3://bucket/prefix', not {settings.storage.storage!r}")
