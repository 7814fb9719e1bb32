"""Output file storage. ``LocalStorage`` keeps files under ``<data_dir>/files``; the API serves them
at ``/v1/File/{accesskey}/{name}``, readable only with the task's access key. An S3 backend would
implement the same ``save``/``open``/``delete`` and return presigned URLs from ``url``."""
from __future__ import annotations

import mimetypes
import shutil
from pathlib import Path

from easel.config import Settings


class LocalStorage:
    """Files in ``<data_dir>/files/<task uuid>/<name>``."""

    def __init__(self, settings: Settings):
        self.root = settings.files_dir
        self.public_url = settings.public_url

    def save(self, task_uuid: str, src: Path) -> dict:
        """Move ``src`` into the task's folder; return the output record fields."""
        folder = self.root / task_uuid
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / src.name
        shutil.move(str(src), dest)
        ctype = mimetypes.guess_type(src.name)[0] or "application/octet-stream"
        return {"name": src.name, "contenttype": ctype, "size": dest.stat().st_size,
                "path": f"{task_uuid}/{src.name}"}

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
