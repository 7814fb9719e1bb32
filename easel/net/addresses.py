"""Which addresses a server may fetch from: host resolution with a deadline, the non-public
address rules (SSRF), the operator's allow-list (``Settings.fetch_allow``) and :func:`vet_url`."""
from __future__ import annotations

import ipaddress
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from urllib.parse import urlsplit

from easel.net.deadline import Deadline
from easel.net.policy import FetchError, FetchPolicy, URLRefused


_resolver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="easel-dns")


def _resolve(host: str, port: int, deadline: Deadline | None) -> list:
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


def vet_url(url: str, policy: FetchPolicy, deadline: Deadline | None = None) -> tuple[str, str, int, str]:
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


CHECK_TTL = 60.0  # seconds a check_url verdict on a (scheme, host, port) is reused
CHECK_RETRY_TTL = 10.0  # ... when the host could not be resolved (it may resolve soon)
_CHECK_ENTRIES = 1024
_checks: dict[tuple, tuple[float, Exception | None]] = {}
_checks_lock = threading.Lock()


def check_url(url: str, policy: FetchPolicy, seconds: float) -> None:
    """:func:`vet_url` within ``seconds`` (DNS included): whether ``url`` may be fetched or posted
    to under ``policy`` (e.g. a webhook's ``callbackUrl``, checked when the Run is submitted).

    An early answer, not the guard: what actually connects (:func:`vet_url` at delivery or
    download time) resolves again. So the verdict on a ``(scheme, host, port)`` under one
    allow-list is reused for :data:`CHECK_TTL` seconds (:data:`CHECK_RETRY_TTL` when the host
    did not resolve): a client that sends the same ``callbackUrl`` with every Run pays for one
    lookup a minute, and a slow resolver holds up one Run instead of each.

    Raises:
        URLRefused: bad scheme, no host, or a non-public address that is not allowed.
        FetchError: the host cannot be resolved (now: it may resolve later) or not in time.
        ValueError: the URL's port is out of range or its host is malformed.
    """
    parts = urlsplit(url)
    key = (parts.scheme, parts.hostname, parts.port, policy.allow)
    now = time.monotonic()
    with _checks_lock:
        expires, verdict = _checks.get(key, (0.0, None))
    if expires > now:
        if verdict is not None:
            raise type(verdict)(*verdict.args)  # a fresh exception: threads share the entry
        return
    try:
        vet_url(url, policy, Deadline(seconds, "checking the URL"))
        verdict, ttl = None, CHECK_TTL
    except URLRefused as exc:
        verdict, ttl = exc, CHECK_TTL
    except FetchError as exc:
        verdict, ttl = exc, CHECK_RETRY_TTL
    with _checks_lock:
        if len(_checks) >= _CHECK_ENTRIES:
            _checks.clear()  # many distinct hosts: start again rather than grow
        _checks[key] = (time.monotonic() + ttl, verdict)
    if verdict is not None:
        raise verdict
