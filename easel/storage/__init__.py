"""Output file storage. ``LocalStorage`` keeps files under ``<data_dir>/files``; the API serves them
at ``/v1/File/{accesskey}/{name}``, readable only with the task's access key. An S3 backend would
implement the same ``save``/``open``/``delete`` and return presigned URLs from ``url``."""
from __future__ import annotations

import errno
import mimetypes
import os
import shutil
from pathlib import Path

from easel.config import Settings


class LocalStorage:
    """Files in ``<data_dir>/files/<task uuid>/<name>``."""

    def __init__(self, settings: Settings):
        self.root = settings.files_dir
        self.public_url = settings.public_url

    def save(self, task_uuid: str, src: Path) -> dict:
        """Move ``src`` into the task's folder; return the output record fields.

        All or nothing: a rename on the same file system, otherwise a copy to a hidden temporary
        file renamed into place, so a failure (e.g. ``ENOSPC``, disk full) leaves no partial file.

        Raises:
            OSError: the file could not be stored (nothing was left behind).
        """
        folder = self.root / task_uuid
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / src.name
        tmp = folder / f".{src.name}.part"
        try:
            try:
                os.replace(src, dest)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                shutil.copyfile(src, tmp)
                os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        ctype = mimetypes.guess_type(src.name)[0] or "application/octet-stream"
        return {"name": src.name, "contenttype": ctype, "size": dest.stat().st_size,
                "path": f"{task_uuid}/{src.name}"}

    def discard(self, task_uuid: str, saved: list[dict]) -> None:
        """Remove outputs stored by :meth:`save` (a task that did not complete keeps none)."""
        for record in saved:
            (self.root / record["path"]).unlink(missing_ok=True)
        try:
            (self.root / task_uuid).rmdir()
        except OSError:
            pass

    def path(self, relative: str) -> Path:
        """Absolute path of a stored file; refuses anything outside the storage root."""
        p = (self.root / relative).resolve()
        if self.root.resolve() not in p.parents:
            raise FileNotFoundError(relative)
        return p

    def url(self, accesskey: str, name: str, base_url: str | None = None) -> str:
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
        from urllib.parse import unquote

        return parts[0], unquote(parts[1])
