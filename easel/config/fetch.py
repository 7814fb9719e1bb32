"""``Settings.fetch``: what a URL fetch or an upload may reach, take and last."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FetchSettings:
    """Limits of the safe fetcher (``easel.net.fetch``) and of request files.

    Attributes:
        fetch_allow: Hosts or CIDR ranges the URL fetcher may reach although they are loopback,
            private or link-local (tests allow their local file server this way).
        fetch_connect_timeout / fetch_read_timeout: Seconds, per connection / per read.
        fetch_total_timeout_seconds: Deadline of one whole download (DNS, connect, redirects
            and the transfer), whatever the per-read timeouts allow.
        upload_max_bytes: Size cap of one uploaded request file (Run multipart or
            ``/v1/File/Upload``) and of an input image fetched from a URL, in bytes.
        max_image_pixels: Largest image input (width × height) a tool decodes; larger ones,
            and decompression bombs, are refused from the header before any pixel is decoded.
    """

    fetch_allow: tuple[str, ...] = field(default_factory=tuple)
    fetch_connect_timeout: float = 10.0
    fetch_read_timeout: float = 60.0
    fetch_total_timeout_seconds: float = 600.0
    upload_max_bytes: int = 64 * 1024**2
    max_image_pixels: int = 4096 * 4096
