"""Image inputs and extra outputs of a running task (what ``WorkerContext.image`` and
``WorkerContext.extra_output`` do).

An image input is located with :class:`easel.storage.inputs.InputFiles` (multipart upload, a file
uploaded with ``/v1/File/Upload``, this server's own URL: read through ``easel.storage``), else fetched from its
``http(s)`` URL with the safe fetcher (``easel.net.fetch``: public addresses only unless
allow-listed, pinned connection, redirects re-checked, capped at ``Settings.fetch.upload_max_bytes``),
then decoded and validated by :func:`easel.images.decode`.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from easel.images import ImageInputError, decode
from easel.net.fetch import FetchError, FetchPolicy, fetch_to_file
from easel.storage.inputs import InputFiles
from easel.tools.base import PNG_OPTIONS, ToolError

if TYPE_CHECKING:  # pragma: no cover
    import numpy
    from PIL.Image import Image

    from easel.tasks.runner import WorkerContext

EXTRA_FIELD = "extraOutputs"  # beyond Wiro: a tool's schema may offer it (see docs/api.md)
_NAME = re.compile(r"[^A-Za-z0-9_-]+")


def extras_requested(inputs: dict) -> bool:
    """Whether the validated inputs ask for intermediate images (``extraOutputs`` true/1/yes)."""
    return str(inputs.get(EXTRA_FIELD, "") or "").strip().lower() in ("1", "true", "yes", "on")


def load_image(ctx: WorkerContext, field: str, value: str) -> Image:
    """Decode the image input ``field`` of ``ctx``'s task: a ``PIL.Image`` in mode ``RGB`` or
    ``RGBA`` (see :func:`easel.images.decode`).

    Raises:
        ToolError: naming the field (missing, refused URL, download failure, not an image, too large).
    """
    settings = ctx.worker.settings
    try:
        where = InputFiles(ctx.store, ctx.worker.storage).locate(ctx.project_id, field, value,
                                                                           ctx.task_uuid, ctx.inputs_dir)
        if isinstance(where, Path):
            return decode(where, field, settings.fetch.max_image_pixels)
        policy = FetchPolicy(allow=settings.fetch.fetch_allow, max_bytes=settings.fetch.upload_max_bytes,
                             connect_timeout=settings.fetch.fetch_connect_timeout, read_timeout=settings.fetch.fetch_read_timeout)
        with tempfile.TemporaryDirectory(dir=ctx.output_dir) as tmp:
            path = Path(tmp) / "download"
            try:
                fetch_to_file(where, path, policy)
            except FetchError as exc:
                raise ToolError(f"Request parameter [{field}]: could not fetch {where}: {exc}") from None
            ctx.log(f"{field}: fetched {path.stat().st_size} bytes from {where}")
            return decode(path, field, settings.fetch.max_image_pixels)
    except ImageInputError as exc:
        raise ToolError(exc.message) from None


def save_extra(output_dir: Path, name: str, image: Image | numpy.ndarray) -> Path:
    """Write an intermediate image as ``extra-<name>.png`` (PIL image or HxW[xC] uint8 array)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    path = output_dir / f"extra-{_NAME.sub('_', name)[:60]}.png"
    image.save(path, format="PNG", **PNG_OPTIONS)
    return path
