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
import ipaddress
import json
import os
import re
import socket
import struct
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpcore
import httpx

from easel.net import partfiles

if TYPE_CHECKING:
    from easel.storage import Storage

MAX_REDIRECTS = 5
_FETCHED_NAME = re.compile(r"^[0-9a-f]{64}\.safetensors$")
_SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                       "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


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


class _Deadline:
    """Seconds left of one fetch's total budget; raises :class:`FetchError` once it is spent."""

    def __init__(self, seconds: float, what: str):
        self.end = time.monotonic() + seconds
        self.seconds = seconds
        self.what = what

    def left(self) -> float:
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise FetchError(f"{self.what} took longer than the {self.seconds:g}-second limit for one download "
                             "(EASEL_FETCH_TOTAL_TIMEOUT_SECONDS)")
        return remaining

    def timeout(self, policy: "FetchPolicy") -> httpx.Timeout:
        left = self.left()
        return httpx.Timeout(min(policy.read_timeout, left), connect=min(policy.connect_timeout, left),
                             pool=min(policy.connect_timeout, left))


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write waits at most until the fetch's deadline."""

    def __init__(self, stream: httpcore.NetworkStream, deadline: _Deadline):
        self._stream, self._deadline = stream, deadline

    def _t(self, timeout: float | None) -> float:
        left = self._deadline.end - time.monotonic()
        if left <= 0:
            raise httpcore.ReadTimeout("the download's total time limit passed")
        return left if timeout is None else min(timeout, left)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, self._t(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, self._t(timeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, self._t(timeout)), self._deadline)

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.SyncBackend):
    """httpcore's socket backend, with every socket operation bounded by one :class:`_Deadline`
    (a server dripping its headers or body one byte at a time cannot outlast it)."""

    def __init__(self, deadline: _Deadline):
        self._deadline = deadline

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        left = max(0.001, self._deadline.end - time.monotonic())
        stream = super().connect_tcp(host, port, left if timeout is None else min(timeout, left), local_address,
                                     socket_options)
        return _DeadlineStream(stream, self._deadline)


def _client(policy: "FetchPolicy", deadline: _Deadline) -> httpx.Client:
    transport = httpx.HTTPTransport(trust_env=False)
    # httpx has no total timeout: give its connection pool a socket backend that enforces one
    transport._pool = httpcore.ConnectionPool(ssl_context=httpx.create_ssl_context(),
                                              network_backend=_DeadlineBackend(deadline))
    return httpx.Client(transport=transport, timeout=deadline.timeout(policy), follow_redirects=False,
                        trust_env=False)


_resolver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="easel-dns")


def _resolve(host: str, port: int, deadline: "_Deadline | None") -> list:
    """``getaddrinfo`` with a deadline (the C resolver has none of its own)."""
    if deadline is None:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    future = _resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        return future.result(timeout=deadline.left())
    except FutureTimeout:
        raise FetchError(f"resolving host {host!r} took longer than the download's time limit") from None


def _allowed(host: str, port: int, ip: ipaddress._BaseAddress, allow: tuple[str, ...]) -> bool:
    for rule in allow:
        if rule in (host, f"{host}:{port}"):
            return True
        try:
            if ip in ipaddress.ip_network(rule, strict=False):
                return True
        except ValueError:
            continue
    return False


_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix: embeds an IPv4 address
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215 local-use translation prefix
_6TO4 = ipaddress.ip_network("2002::/16")  # RFC 3056: 2002:AABB:CCDD:: carries IPv4 A.B.C.D
_V4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d (RFC 4291 2.5.5.1)
_SITE_LOCAL = ipaddress.ip_network("fec0::/10")  # deprecated site-local (RFC 3879)


def non_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``ip`` is not a public unicast address a server should fetch from, or None if it is.

    Refused: everything Python's ``ipaddress`` does not call global (loopback, RFC 1918 private,
    link-local incl. 169.254.169.254 cloud metadata, CGNAT, reserved, unspecified), multicast,
    site-local ``fec0::/10``, the NAT64 local-use prefix ``64:ff9b:1::/48``, and the IPv6 forms
    that carry an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible ``::a.b.c.d``,
    NAT64 ``64:ff9b::a.b.c.d``, 6to4 ``2002:AABB:CCDD::``, Teredo) when that IPv4 address is not public.
    """
    if ip.is_multicast:
        return "multicast"
    if ip.version == 6:
        embedded = None
        if ip.ipv4_mapped is not None:
            embedded = ip.ipv4_mapped
        elif ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        elif ip in _6TO4:
            embedded = ip.sixtofour
        elif ip.teredo is not None:
            embedded = ip.teredo[1]
        elif ip in _V4_COMPATIBLE and int(ip) > 1:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = non_public(embedded)
            return f"{inner}, embedded in an IPv6 address" if inner else None
        if ip in _SITE_LOCAL:
            return "site-local"
        if ip in _NAT64_LOCAL:
            return "local-use NAT64"
    if not ip.is_global:
        kind = ("loopback" if ip.is_loopback else "link-local" if ip.is_link_local else
                "private" if ip.is_private else "reserved or not globally routable")
        return kind
    return None


def vet_url(url: str, policy: FetchPolicy, deadline: _Deadline | None = None) -> tuple[str, str, int, str]:
    """Check ``url`` and resolve its host.

    Returns:
        ``(scheme, host, port, ip)`` where ``ip`` is the vetted address to connect to.

    Raises:
        FetchError: bad scheme, unresolvable host, or an address that is not public and not allowed.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise URLRefused(f"only http(s) URLs can be fetched, not {parts.scheme or 'a relative URL'!r}")
    host = parts.hostname
    if not host:
        raise URLRefused("the URL has no host")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = _resolve(host, port, deadline)
    except socket.gaierror as exc:
        raise FetchError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    ips = [ipaddress.ip_address(i[4][0].split("%")[0]) for i in infos]
    for ip in ips:
        why = non_public(ip)
        if why and not _allowed(host, port, ip, policy.allow):
            raise URLRefused(f"host {host!r} resolves to {ip}, a non-public address ({why}); such URLs are refused")
    return parts.scheme, host, port, str(ips[0])


def check_url(url: str, policy: FetchPolicy, seconds: float) -> None:
    """:func:`vet_url` within ``seconds`` (DNS included): whether ``url`` may be fetched or posted
    to under ``policy`` (e.g. a webhook's ``callbackUrl``, checked when the Run is submitted).

    Raises:
        URLRefused: bad scheme, no host, or a non-public address that is not allowed.
        FetchError: the host cannot be resolved (now: it may resolve later) or not in time.
    """
    vet_url(url, policy, _Deadline(seconds, "checking the URL"))


def _pinned(url: str, policy: FetchPolicy, deadline: _Deadline | None = None) -> tuple[str, str, str]:
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
    deadline = _Deadline(policy.total_timeout, "posting the webhook")
    pinned, host, host_header = _pinned(url, policy, deadline)
    with _client(policy, deadline) as client:
        try:
            resp = client.post(pinned, content=body, headers={**headers, "Host": host_header},
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
    deadline = _Deadline(policy.total_timeout, "the download")
    first_host = urlsplit(url).netloc
    with _client(policy, deadline) as client:
        for _ in range(MAX_REDIRECTS + 1):
            pinned, host, host_header = _pinned(url, policy, deadline)
            extra = headers if headers and urlsplit(url).netloc == first_host else {}
            req = client.build_request("GET", pinned, headers={**extra, "Host": host_header, "Accept-Encoding": "identity"},
                                       extensions={"sni_hostname": host, "timeout": deadline.timeout(policy).as_dict()})
            try:
                resp = client.send(req, stream=True)
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


def check_safetensors(path: Path) -> dict:
    """Validate that ``path`` is a well-formed safetensors file without deserialising tensors.

    Returns:
        The header's tensor table (name → {dtype, shape, data_offsets}).

    Raises:
        FetchError: a pickle (``.ckpt``/``.pt``/``.bin``), a truncated file, or an inconsistent header.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise FetchError("file is too short to be a .safetensors file")
        if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or head[:2] == b"PK":
            raise FetchError("file is a pickle / zip checkpoint (.ckpt, .pt, .bin); only .safetensors is accepted")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > min(size - 8, 100 * 1024**2):
            raise FetchError("file is not a .safetensors file (bad header length)")
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            raise FetchError("file is not a .safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise FetchError("file is not a .safetensors file (header is not an object)")
    body = size - 8 - n
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        raise FetchError(".safetensors file holds no tensors")
    for name, info in tensors.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            count = 1
            for d in shape:
                count *= int(d)
            if dtype not in _SAFETENSORS_DTYPES or not 0 <= start <= end <= body or end - start != count * _SAFETENSORS_DTYPES[dtype]:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise FetchError(f".safetensors header entry {name!r} is inconsistent") from None
    return tensors


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
