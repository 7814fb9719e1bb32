"""What a download may do (:class:`FetchPolicy`) and the errors that refuse one."""
from __future__ import annotations

from dataclasses import dataclass


class FetchError(ValueError):
    """A URL that may not be fetched, or whose content is refused. The message says why."""


class URLRefused(FetchError):
    """The URL itself is refused (scheme, missing host, or a non-public address): retrying cannot help."""


@dataclass(frozen=True)
class FetchPolicy:
    """Limits for one kind of download."""

    allow: tuple[str, ...] = ()
    max_bytes: int = 2 * 1024**3
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    total_timeout: float = 600.0  # the whole fetch: DNS, connects, redirects and transfer
