"""Download of untrusted URLs (user LoRAs, input images) with the hostile-input rules applied.

- Only ``http``/``https``. The host is resolved once, every address must be globally routable
  (no loopback, private, link-local — which covers cloud metadata at 169.254.169.254 —, CGNAT,
  multicast or reserved ranges) unless the operator allow-listed it (``Settings.fetch_allow``),
  and the connection goes to that vetted address (so DNS cannot change between check and use;
  TLS still verifies the certificate against the original host name via SNI).
- Redirects are followed by hand, at most 5, each hop checked again.
- Connect/read timeouts; a byte cap enforced on ``Content-Length`` and while streaming.
- Weight files must parse as ``safetensors`` (header, dtypes, offsets); pickles are refused before
  anything deserialises them. Accepted files are cached under their SHA-256.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import socket
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

MAX_REDIRECTS = 5
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


def vet_url(url: str, policy: FetchPolicy) -> tuple[str, str, int, str]:
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
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FetchError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    ips = [ipaddress.ip_address(i[4][0].split("%")[0]) for i in infos]
    for ip in ips:
        if not ip.is_global and not _allowed(host, port, ip, policy.allow):
            raise URLRefused(f"host {host!r} resolves to {ip}, a non-public address (loopback, private, "
                             f"link-local or reserved); such URLs are refused")
    return parts.scheme, host, port, str(ips[0])


def _pinned(url: str, policy: FetchPolicy) -> tuple[str, str, str]:
    """``url`` with its host replaced by the vetted IP; also the host (for SNI) and Host header."""
    scheme, host, port, ip = vet_url(url, policy)
    parts = urlsplit(url)
    netloc_ip = f"[{ip}]" if ":" in ip else ip
    pinned = urlunsplit((scheme, f"{netloc_ip}:{port}", parts.path or "/", parts.query, ""))
    return pinned, host, host if parts.port is None else f"{host}:{parts.port}"


def post_pinned(url: str, body: bytes, headers: dict, policy: FetchPolicy) -> int:
    """POST ``body`` to an untrusted ``url`` (webhooks) under the same rules as downloads.

    The host is vetted and the connection pinned to the vetted address; redirects are **not**
    followed (a redirect answer counts as a failure). Returns the HTTP status code.

    Raises:
        FetchError: refused URL, timeout or connection error.
    """
    timeout = httpx.Timeout(policy.read_timeout, connect=policy.connect_timeout)
    pinned, host, host_header = _pinned(url, policy)
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        try:
            resp = client.post(pinned, content=body, headers={**headers, "Host": host_header},
                               extensions={"sni_hostname": host})
        except httpx.TimeoutException:
            raise FetchError(f"timed out posting to {host}") from None
        except httpx.HTTPError as exc:
            raise FetchError(f"could not post to {host}: {exc}") from None
        return resp.status_code


def fetch_to_file(url: str, dest: Path, policy: FetchPolicy) -> int:
    """Download ``url`` to ``dest`` under ``policy``; return the byte count.

    Raises:
        FetchError: refused URL, HTTP error status, timeout, too many redirects, or over the cap.
    """
    timeout = httpx.Timeout(policy.read_timeout, connect=policy.connect_timeout)
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            pinned, host, host_header = _pinned(url, policy)
            req = client.build_request("GET", pinned, headers={"Host": host_header},
                                       extensions={"sni_hostname": host})
            try:
                resp = client.send(req, stream=True)
            except httpx.TimeoutException:
                raise FetchError(f"timed out fetching {host}") from None
            except httpx.HTTPError as exc:
                raise FetchError(f"could not fetch {host}: {exc}") from None
            try:
                if resp.is_redirect:
                    url = urljoin(url, resp.headers.get("location", ""))
                    continue
                if resp.status_code != 200:
                    raise FetchError(f"{host} answered HTTP {resp.status_code}")
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                    raise FetchError(f"file is {int(declared)} bytes, over the {policy.max_bytes}-byte limit")
                total = 0
                with open(dest, "wb") as fh:
                    try:
                        for chunk in resp.iter_bytes(1 << 20):
                            total += len(chunk)
                            if total > policy.max_bytes:
                                raise FetchError(f"file exceeds the {policy.max_bytes}-byte limit")
                            fh.write(chunk)
                    except httpx.TimeoutException:
                        raise FetchError(f"timed out reading from {host}") from None
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


def fetch_safetensors(url: str, cache_dir: Path, policy: FetchPolicy) -> Path:
    """Fetch a ``.safetensors`` file from an untrusted URL into ``cache_dir/<sha256>.safetensors``.

    A URL fetched before is served from the cache index without a new download.

    Raises:
        FetchError: see :func:`fetch_to_file` and :func:`check_safetensors`.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    index_path = cache_dir / "urls.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    known = index.get(url)
    if known and (cache_dir / known).exists():
        return cache_dir / known
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".part")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        fetch_to_file(url, tmp_path, policy)
        check_safetensors(tmp_path)
        digest = hashlib.sha256()
        with open(tmp_path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        final = cache_dir / f"{digest.hexdigest()}.safetensors"
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)
    index[url] = final.name
    index_path.write_text(json.dumps(index))
    return final
