"""One download's total time budget, enforced on every socket operation.

httpx has no total timeout: :func:`client` gives its connection pool a socket backend whose every
connect, read and write waits at most until the :class:`Deadline`, so a server dripping its
headers or body one byte at a time cannot outlast it.
"""
from __future__ import annotations

import time

import httpcore
import httpx

from easel.net.policy import FetchError, FetchPolicy


class Deadline:
    """Seconds left of one fetch's total budget (``seconds`` from now, on the monotonic clock);
    ``what`` names the operation in the error. :meth:`left` raises :class:`FetchError` once it is spent."""

    def __init__(self, seconds: float, what: str):
        self.end = time.monotonic() + seconds
        self.seconds = seconds
        self.what = what

    def left(self) -> float:
        """Seconds left (> 0). Raises :class:`FetchError` once the budget is spent."""
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise FetchError(f"{self.what} took longer than the {self.seconds:g}-second limit for one download "
                             "(EASEL_FETCH_TOTAL_TIMEOUT_SECONDS)")
        return remaining

    def timeout(self, policy: FetchPolicy) -> httpx.Timeout:
        """httpx timeouts: the policy's connect/read timeouts, none beyond the seconds left."""
        left = self.left()
        return httpx.Timeout(min(policy.read_timeout, left), connect=min(policy.connect_timeout, left),
                             pool=min(policy.connect_timeout, left))


class DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write waits at most until the fetch's deadline."""

    def __init__(self, stream: httpcore.NetworkStream, deadline: Deadline):
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
        return DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, self._t(timeout)), self._deadline)

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


class DeadlineBackend(httpcore.SyncBackend):
    """httpcore's socket backend, with every socket operation bounded by one :class:`Deadline`
    (a server dripping its headers or body one byte at a time cannot outlast it)."""

    def __init__(self, deadline: Deadline):
        self._deadline = deadline

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        left = max(0.001, self._deadline.end - time.monotonic())
        stream = super().connect_tcp(host, port, left if timeout is None else min(timeout, left), local_address,
                                     socket_options)
        return DeadlineStream(stream, self._deadline)


def client(policy: FetchPolicy, deadline: Deadline) -> httpx.Client:
    """An httpx client that follows no redirects, ignores proxy variables and bounds every socket
    operation by ``deadline``."""
    transport = httpx.HTTPTransport(trust_env=False)
    # httpx has no total timeout: give its connection pool a socket backend that enforces one
    transport._pool = httpcore.ConnectionPool(ssl_context=httpx.create_ssl_context(),
                                              network_backend=DeadlineBackend(deadline))
    return httpx.Client(transport=transport, timeout=deadline.timeout(policy), follow_redirects=False,
                        trust_env=False)
