"""Download of untrusted URLs (user LoRAs, input images) with the hostile-input rules applied.

- Only ``http``/``https``. The host is resolved once, every address must be globally routable
  (no loopback, private, link-local — which covers cloud metadata at 169.254.169.254 —, CGNAT,
  multicast or reserved ranges) unless the operator allow-listed it (``Settings.fetch_allow``),
  and the connection goes to that vetted address (so DNS cannot change between check and use;
  TLS still verifies the certificate against the original host name via SNI).
- Redirects are followed by hand, at most 5, each hop checked again.
- Connect/read timeouts and a total deadline per download (DNS included); a byte cap enforced
  on ``Content-Length`` and while streaming; ``Accept-Encoding: identity``, encoded bodies refused.
- Weight files must parse as ``safetensors`` (header, dtypes, offsets); pickles are refused before
  anything deserialises them. Accepted files are kept under their SHA-256 in the storage
  (``fetched/``, see :func:`fetch_safetensors`).
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from easel.net import partfiles
from easel.net.addresses import check_url, non_public, vet_url
from easel.net.deadline import Deadline, client
from easel.net.policy import FetchError, FetchPolicy, URLRefused
from easel.net.safetensors_header import check_safetensors

if TYPE_CHECKING:
    from easel.storage import Storage

__all__ = ["FetchError", "FetchPolicy", "MAX_REDIRECTS", "URLRefused", "check_safetensors", "check_url",
           "fetch_safetensors", "fetch_to_file", "non_public", "post_pinned", "vet_url"]

MAX_REDIRECTS = 5
_FETCHED_NAME = re.compile(r"^[0-9a-f]{64}\.safetensors$")


def _pinned(url: str, policy: FetchPolicy, deadline: Deadline | None = None) -> tuple[str, str, str]:
    """``url`` with its host replaced by the vetted IP; also the host (for SNI) and Host header."""
    scheme, host, port, ip = vet_url(url, policy, deadline)
    parts = urlsplit(url)
    netloc_ip = f"[{ip}]" if ":" in ip else ip
    pinned = urlunsplit((scheme, f"{netloc_ip}:{port}", parts.path or "/", parts.query, ""))
    return pinned, host, host if parts.port is None else f"{host}:{parts.port}"


def post_pinned(url: str, body: bytes, headers: dict, policy: FetchPolicy) -> int:
    """POST ``body`` to an untrusted ``url`` (webhooks) under the same rules as downloads.

    The host is vetted and the connection pinned to the vetted address; redirects are **not**
    followed (a redirect answer counts as a failure). The whole attempt (DNS, connect, send, answer)
    ends within ``policy.total_timeout`` seconds. Returns the HTTP status code.

    Raises:
        FetchError: refused URL, timeout or connection error.
    """
    deadline = Deadline(policy.total_timeout, "posting the webhook")
    pinned, host, host_header = _pinned(url, policy, deadline)
    with client(policy, deadline) as http:
        try:
            resp = http.post(pinned, content=body, headers={**headers, "Host": host_header},
                               extensions={"sni_hostname": host})
        except httpx.TimeoutException:
            raise FetchError(f"timed out posting to {host}") from None
        except httpx.HTTPError as exc:
            raise FetchError(f"could not post to {host}: {exc}") from None
        return resp.status_code


def fetch_to_file(url: str, dest: Path, policy: FetchPolicy, headers: dict | None = None,
                  progress: "Callable[[int, int], None] | None" = None) -> int:
    """Download ``url`` to ``dest`` under ``policy``; return the byte count.

    ``headers`` (e.g. a Civitai token) go to the URL's own host only, never to a host a redirect
    leads to (Civitai redirects to its storage host with a signed URL). ``progress(done, total)``
    (total 0 when the server sends no length) is called at most every 0.25 s; it may raise to stop.

    The request asks for ``Accept-Encoding: identity`` and a body sent with any other
    ``Content-Encoding`` is refused: bytes are never decompressed, so the size cap counts what
    is written (a 2 KB gzip bomb cannot expand to gigabytes in memory). The whole download
    (DNS, connects, redirects, transfer) must end within ``policy.total_timeout`` seconds.

    Raises:
        FetchError: refused URL, HTTP error status, encoded body, timeout, too many redirects, or
            over the cap.
    """
    deadline = Deadline(policy.total_timeout, "the download")
    first_host = urlsplit(url).netloc
    with client(policy, deadline) as http:
        for _ in range(MAX_REDIRECTS + 1):
            pinned, host, host_header = _pinned(url, policy, deadline)
            extra = headers if headers and urlsplit(url).netloc == first_host else {}
            req = http.build_request("GET", pinned, headers={**extra, "Host": host_header, "Accept-Encoding": "identity"},
                                       extensions={"sni_hostname": host, "timeout": deadline.timeout(policy).as_dict()})
            try:
                resp = http.send(req, stream=True)
            except httpx.TimeoutException:
                deadline.left()
                raise FetchError(f"timed out fetching {host}") from None
            except httpx.HTTPError as exc:
                raise FetchError(f"could not fetch {host}: {exc}") from None
            try:
                if resp.is_redirect:
                    url = urljoin(url, resp.headers.get("location", ""))
                    continue
                if resp.status_code != 200:
                    raise FetchError(f"{host} answered HTTP {resp.status_code}")
                encoding = resp.headers.get("content-encoding", "").strip().lower()
                if encoding not in ("", "identity"):
                    raise FetchError(f"{host} sent a {encoding}-encoded body although Easel asked for none; "
                                     "serve the file uncompressed")
                declared = resp.headers.get("content-length", "")
                if declared.isascii() and declared.isdigit() and len(declared) < 20 \
                        and int(declared) > policy.max_bytes:
                    raise FetchError(f"file is {int(declared)} bytes, over the {policy.max_bytes}-byte limit")
                total = 0
                expected = int(declared) if declared.isascii() and declared.isdigit() and len(declared) < 20 else 0
                last = 0.0
                try:
                    with open(dest, "wb") as fh:
                        for chunk in resp.iter_raw(1 << 20):
                            total += len(chunk)
                            if total > policy.max_bytes:
                                raise FetchError(f"file exceeds the {policy.max_bytes}-byte limit")
                            fh.write(chunk)
                            if progress is not None and time.monotonic() - last >= 0.25:
                                last = time.monotonic()
                                progress(total, max(expected, total))
                except httpx.TimeoutException:
                    deadline.left()
                    raise FetchError(f"timed out reading from {host}") from None
                except httpx.HTTPError as exc:
                    raise FetchError(f"could not fetch {host}: {exc}") from None
                return total
            finally:
                resp.close()
    raise FetchError(f"more than {MAX_REDIRECTS} redirects")


def fetch_safetensors(url: str, storage: "Storage", policy: FetchPolicy, cache_dir: Path,
                      refresh_after: float = 0.0, headers: dict | None = None,
                      progress: "Callable[[int, int], None] | None" = None) -> Path:
    """Fetch a ``.safetensors`` file from an untrusted URL; return a local path of it.

    The file is kept in the storage (``easel.storage``: the data directory, or the bucket every
    worker of a fleet shares) as ``fetched/<sha256>.safetensors``, and the URL's answer as
    ``fetched/urls/<sha256 of the URL>`` (holding that file name). A URL fetched before, by this
    process or any other sharing the storage, is not downloaded again: the stored file is used
    (downloaded once into ``cache_dir`` when the storage is remote). With ``refresh_after`` > 0,
    a stored file older than that many seconds is touched when used, so the retention sweeper
    (which deletes fetched files not used for ``orphan_retention_seconds``) keeps it.

    ``headers`` and ``progress`` are passed to :func:`fetch_to_file` (catalog URL sources: a
    Civitai token for Civitai's own host, the task's "Downloading" progress).

    Raises:
        FetchError: see :func:`fetch_to_file` and :func:`check_safetensors`.
        OSError: the storage failed.
    """
    index = f"fetched/urls/{hashlib.sha256(url.encode()).hexdigest()}"
    try:
        name = storage.get_bytes(index).decode("ascii", "replace")
    except FileNotFoundError:
        name = ""
    if _FETCHED_NAME.match(name):
        try:
            path = storage.local_path(f"fetched/{name}", cache_dir)
        except FileNotFoundError:
            pass  # swept meanwhile: fetch again
        else:
            if refresh_after > 0:
                stat = storage.stat(index)
                if stat is not None and stat.mtime < time.time() - refresh_after:
                    storage.touch(f"fetched/{name}")
                    storage.touch(index)
            return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=partfiles.SUFFIX)
    tmp_path = Path(tmp)
    try:
        partfiles.hold(fd)  # until the file is renamed or removed: see easel.net.partfiles
        fetch_to_file(url, tmp_path, policy, headers=headers, progress=progress)
        check_safetensors(tmp_path)
        digest = hashlib.sha256()
        with open(tmp_path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        final = cache_dir / f"{digest.hexdigest()}.safetensors"
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)
        os.close(fd)
    storage.put(f"fetched/{final.name}", final, content_type="application/octet-stream")
    storage.put_bytes(index, final.name.encode(), content_type="text/plain")
    return final
