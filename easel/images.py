"""Image inputs: untrusted bytes → a validated, decoded ``PIL.Image``.

Shared by the API (which checks what it can before a task is queued: uploaded files, files
uploaded with ``/v1/File/Upload``) and the worker (which also fetches URLs). The rules:

- formats: JPEG, PNG and WebP (the container is sniffed from the bytes, not the file name); HEIC
  too when ``pillow-heif`` is installed (optional: it registers itself with Pillow);
- the pixel count (``width × height`` from the header) must be at most ``max_pixels``; this is
  checked **before** any pixel is decoded, so a decompression bomb (a small file declaring a huge
  canvas) costs nothing;
- EXIF orientation is applied (``ImageOps.exif_transpose``), as cameras and phones store it;
- the mode is normalised: images with transparency become ``RGBA``, everything else ``RGB``.

Errors are :class:`ImageInputError`, whose message names the request field.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}

try:  # optional HEIC support, only when the well-kept plugin is installed
    import pillow_heif  # type: ignore

    pillow_heif.register_heif_opener()
    FORMATS["HEIF"] = "heic"
except Exception:  # pragma: no cover - depends on the environment
    pass


class ImageInputError(ValueError):
    """An image input that cannot be used. ``field`` is the request field; ``message`` says why."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def _open(source: Path | bytes, field: str, max_pixels: int):
    from PIL import Image, UnidentifiedImageError

    accepted = ", ".join(sorted(set(FORMATS.values())))
    fp: Any = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(fp, formats=list(FORMATS))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        fp.close()
        raise ImageInputError(field, f"Request parameter [{field}] is not an image this tool reads "
                                     f"(accepted: {accepted})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        fp.close()
        raise ImageInputError(field, f"Request parameter [{field}]: the image declares more pixels than "
                                     f"this server decodes ({max_pixels}); refused as a decompression bomb") from None
    width, height = image.size
    if width <= 0 or height <= 0 or width * height > max_pixels:
        image.close()
        fp.close()
        raise ImageInputError(field, f"Request parameter [{field}]: the image is {width}x{height} = {width * height} "
                                     f"pixels, over this server's limit of {max_pixels} (EASEL_MAX_IMAGE_PIXELS)")
    return image, fp


def probe(source: Path | bytes, field: str, max_pixels: int) -> tuple[int, int, str]:
    """Check an image's container and size from its header only (nothing is decoded).

    Args:
        source: A file path or the file's bytes.
        field: The request field (for messages).
        max_pixels: Largest accepted ``width * height``.

    Returns:
        ``(width, height, format)`` with ``format`` one of ``jpg``, ``png``, ``webp`` (``heic``).

    Raises:
        ImageInputError: not an accepted image, or over ``max_pixels`` (decompression bombs included).
    """
    image, fp = _open(source, field, max_pixels)
    try:
        return image.size[0], image.size[1], FORMATS[image.format]
    finally:
        image.close()
        fp.close()


def decode(source: Path | bytes, field: str, max_pixels: int):
    """Decode an untrusted image into a ``PIL.Image`` in mode ``RGB`` or ``RGBA``.

    The header is checked as in :func:`probe` first; then the pixels are decoded, the EXIF
    orientation applied and the mode normalised (transparency → ``RGBA``, else ``RGB``).

    Raises:
        ImageInputError: as :func:`probe`, or a truncated / corrupt file.
    """
    from PIL import Image, ImageOps

    image, fp = _open(source, field, max_pixels)
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
        out = image.convert("RGBA" if has_alpha else "RGB")
        out.load()
        return out
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageInputError(field, f"Request parameter [{field}]: the image could not be decoded ({exc})") from None
    finally:
        image.close()
        fp.close()
