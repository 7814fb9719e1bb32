"""Wake-ups between the processes of one machine that share a SQLite store: the ``local`` backend
of :mod:`easel.store.notify`.

SQLite has no ``LISTEN/NOTIFY``, and a one-box deployment has no Redis; without this, an API
process's waiters (WebSockets, ``Prefer: wait``) read the store every 20-250 ms for as long as a
task runs (0.2-0.3 CPU-s of a 33 s full-size image, ``docs/benchmarks.md``). With it:

- each API process binds a UDP socket on ``127.0.0.1`` (an ephemeral port) and registers it in
  the folder ``<database file>.wakeups/``: one file per process, named by its pid, holding the
  port and a random token, readable by the database's owner only (the data directory is 0700);
- every process that writes events to that database (the API's local workers, ``easel worker``
  processes on the same machine) sends, after each event commit, one datagram ``<token>
  <task id>`` to each registered port. The registry is listed again at most once a second.

A datagram carries nothing but a task id, and the ``events`` table stays the only source of what is
sent, so a lost or forged wake-up costs at most a store read. The token keeps other users of the
machine, who can reach the port but cannot read the registry, from making waiters read.
Entries of processes that are gone are removed by the next API process that registers.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Callable

from .urls import sqlite_file

log = logging.getLogger("easel.notify")

HOST = "127.0.0.1"
RELIST_SECONDS = 1.0  # how stale a writer's view of the registry may be (a new API process waits this long at most)


def registry_for(database_url: str) -> Path | None:
    """The registry folder of a SQLite database file (``<file>.wakeups``); None for any other
    database, or an in-memory SQLite (no other process can share it)."""
    db_file = sqlite_file(database_url)
    return None if db_file is None else Path(f"{db_file}.wakeups")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: not ours to judge
        return True
    return True


class Sender:
    """A writer's half: :meth:`send` a task id to every registered API process. Never raises."""

    def __init__(self, registry: Path, clock: Callable[[], float] = time.monotonic):
        self.registry = registry
        self._clock = clock
        self._listed_at = float("-inf")
        self._targets: list[tuple[int, bytes]] = []
        self._sock: socket.socket | None = None

    def targets(self) -> list[tuple[int, bytes]]:
        """The registered ``(port, token)`` pairs, listed again when the last listing is older
        than :data:`RELIST_SECONDS`."""
        now = self._clock()
        if now - self._listed_at >= RELIST_SECONDS:
            found = []
            try:
                entries = list(os.scandir(self.registry))
            except OSError:  # no API process registered yet
                entries = []
            for entry in entries:
                try:
                    port, token = Path(entry.path).read_text().split()
                    found.append((int(port), token.encode()))
                except (OSError, ValueError):  # being written, or not one of ours
                    continue
            self._targets, self._listed_at = found, now
        return self._targets

    def send(self, task_id: int) -> None:
        targets = self.targets()
        if not targets:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            for port, token in targets:
                try:
                    self._sock.sendto(token + b" " + str(task_id).encode(), (HOST, port))
                except OSError:  # a process that is gone, a full buffer: its waiters poll
                    continue
        except OSError:
            log.debug("local wake-up not sent", exc_info=True)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Receiver(asyncio.DatagramProtocol):
    """An API process's half: bound to an ephemeral UDP port on ``127.0.0.1`` and registered in
    the registry until :meth:`close`; calls ``on_task(task_id)`` in the event loop for each
    datagram that carries this registration's token."""

    def __init__(self, registry: Path, on_task: Callable[[int], None]):
        self.registry = registry
        self.on_task = on_task
        self.token = secrets.token_hex(16).encode()
        self.entry = registry / str(os.getpid())
        self._transport: asyncio.DatagramTransport | None = None

    async def open(self) -> None:
        """Bind and register. Raises OSError when neither can be done (the caller polls instead)."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(HOST, 0))
        self._transport = transport
        try:
            port = transport.get_extra_info("sockname")[1]
            self.registry.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._remove_stale()
            part = self.entry.with_name(f".{self.entry.name}.part")
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{port} {self.token.decode()}\n")
            os.replace(part, self.entry)  # a writer never reads half a line
        except OSError:
            self.close()
            raise

    def _remove_stale(self) -> None:
        for entry in os.scandir(self.registry):
            if entry.name.isdigit() and not _alive(int(entry.name)):
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass

    def datagram_received(self, data: bytes, addr) -> None:
        token, _, task = data.partition(b" ")
        if not secrets.compare_digest(token, self.token):
            return
        try:
            task_id = int(task)
        except ValueError:
            return
        self.on_task(task_id)

    def close(self) -> None:
        """Unregister and close the socket (idempotent)."""
        try:
            if self.entry.read_text().split()[1].encode() == self.token:  # ours, not a successor's with our pid
                self.entry.unlink()
        except (OSError, IndexError):
            pass
        if self._transport is not None:
            self._transport.close()
            self._transport = None
