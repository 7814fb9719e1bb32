"""Streaming one weights file: resumable across processes (``Range`` from a part under
``<root>/.partial/``), verified against its size and ``sha256``, renamed into place; the folder lock
that makes one download per folder across processes; the disk-space check.

The Hub side (what to fetch, the selection marker, parallel plans) is :mod:`easel.weights.download`.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from easel.catalog import CatalogError

CHUNK = 1 << 20


class DownloadError(CatalogError):
    """Weights could not be fetched; the message names the source and the reason."""


class LicenseNotAccepted(CatalogError):
    """The weights' licence has not been accepted by the operator; the message says how."""


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: its path in the repo, URL, size (bytes, None if unknown) and expected
    ``sha256`` (hex; the catalog's pin, else the Hub's LFS hash, else None)."""

    path: str
    url: str
    size: int | None = None
    sha256: str | None = None


def folder_lock(root: Path, folder: Path):
    """The inter-process lock (``filelock``) of one download folder."""
    from filelock import FileLock

    locks = Path(root) / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / (hashlib.sha1(str(folder).encode()).hexdigest() + ".lock")))


def partial_path(root: Path, dest: Path) -> Path:
    """Where the partial download of ``dest`` lives: ``<root>/.partial/<sha1 of dest>.part``."""
    return Path(root) / ".partial" / (hashlib.sha1(str(dest).encode()).hexdigest() + ".part")


def fetch_file(f: RemoteFile, dest: Path, root: Path, headers: dict, progress: Callable[[int], None] | None = None,
               retries: int = 3) -> None:
    """Stream ``f`` to ``dest``: into ``<root>/.partial/`` first (resumed with ``Range`` when a
    part is there), verified against its size and ``sha256``, then renamed into place.

    ``progress(n)`` gets each chunk's byte count (the bytes a resumed part already held first).
    A connection lost mid-file is resumed up to ``retries`` times. On any other failure, and when
    ``progress`` raises, the part is removed and the exception propagates; on
    ``KeyboardInterrupt`` / process death the part stays for the next try to resume.

    Raises:
        DownloadError: an HTTP error status, a size or sha256 mismatch, a full disk.
    """
    import httpx

    part = partial_path(root, dest)
    part.parent.mkdir(parents=True, exist_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    keep = False
    try:
        have = part.stat().st_size if part.exists() else 0
        if f.size is not None and have > f.size:
            part.unlink()
            have = 0
        with open(part, "ab") as out:
            if have:
                with open(part, "rb") as old:
                    for block in iter(lambda: old.read(CHUNK), b""):
                        digest.update(block)
                if progress:
                    progress(have)
            attempt = 0
            while True:
                req_headers = {**headers, "Accept-Encoding": "identity"}
                if have:
                    req_headers["Range"] = f"bytes={have}-"
                try:
                    with httpx.Client(follow_redirects=True, timeout=httpx.Timeout(30.0, read=120.0),
                                      trust_env=True) as client, \
                            client.stream("GET", f.url, headers=req_headers) as resp:
                        if resp.status_code in (401, 403):
                            raise DownloadError(
                                f"{f.path}: access refused (HTTP {resp.status_code}); set HF_TOKEN (or CIVITAI_TOKEN) "
                                "to a token allowed to read it (gated repos: accept their conditions first)")
                        if resp.status_code == 404:
                            raise DownloadError(f"{f.path}: not found (HTTP 404)")
                        if resp.status_code == 416 and f.size is not None and have == f.size:
                            break
                        if resp.status_code not in (200, 206):
                            raise DownloadError(f"{f.path}: the server answered HTTP {resp.status_code}")
                        if have and resp.status_code == 200:  # Range ignored: start again
                            out.seek(0)
                            out.truncate()
                            digest = hashlib.sha256()
                            have = 0
                        for chunk in resp.iter_raw(CHUNK):
                            try:
                                out.write(chunk)
                            except OSError as exc:
                                raise DownloadError(f"{f.path}: could not write ({exc.strerror}); is the disk full?") \
                                    from None
                            digest.update(chunk)
                            have += len(chunk)
                            if progress:
                                progress(len(chunk))
                    break
                except (httpx.TransportError, httpx.StreamError) as exc:
                    attempt += 1
                    out.flush()
                    if attempt > retries:
                        raise DownloadError(f"{f.path}: connection failed ({type(exc).__name__}: {exc})") from None
                    time.sleep(min(4.0, 0.5 * attempt))
        if f.size is not None and have != f.size:
            raise DownloadError(f"{f.path}: got {have} bytes, expected {f.size}")
        got = digest.hexdigest()
        if f.sha256 and got != f.sha256.lower():
            raise DownloadError(f"{f.path}: sha256 mismatch (expected {f.sha256}, got {got}); the file was removed")
        os.replace(part, dest)
    except (KeyboardInterrupt, SystemExit):
        keep = True  # an interrupted `easel models pull` resumes from here
        raise
    finally:
        if not keep:
            part.unlink(missing_ok=True)


def check_disk(folder: Path, need: int, reserve: int) -> None:
    """Refuse (``DownloadError`` with the numbers) when ``folder``'s disk has less than ``need +
    reserve`` bytes free."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need + reserve:
        raise DownloadError(f"not enough disk space in {folder}: the download needs {_size(need)}"
                            f"{f' plus {_size(reserve)} kept free' if reserve else ''}, {_size(free)} is free")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def human_size(n: int) -> str:
    """``n`` bytes as ``1.2 GB`` (powers of 1000)."""
    return _size(n)
