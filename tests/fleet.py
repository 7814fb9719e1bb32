"""Brokers on loopback for the fleet tests (a Redis and a RabbitMQ of this machine, each test run
under its own queue prefix, everything it created removed afterwards) and ``easel worker``
subprocesses."""
from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


import services
from conftest import TIME_SCALE

REDIS_URL = "redis://127.0.0.1:6379/0"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"
FAMILIES = ("sd15", "sdxl", "flux", "ic-light", "instantid")


def new_prefix() -> str:
    """A queue prefix no other test run (or helper) uses."""
    return f"t{os.getpid()}{secrets.token_hex(3)}"


def redis_broker():
    """``(url, prefix, cleanup)`` for the local Redis; skips the test when it is not reachable."""
    redis = services.import_or_missing("redis", "Redis", "redis-py is not installed (the `fleet` extra)")
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except Exception as exc:
        services.missing("Redis", f"not reachable on 127.0.0.1:6379: {exc}")
    prefix = new_prefix()

    def cleanup() -> None:
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()

    return REDIS_URL, prefix, cleanup


def rabbitmq_broker():
    """``(url, prefix, cleanup)`` for the local RabbitMQ (guest/guest); skips when not reachable."""
    kombu = services.import_or_missing("kombu", "RabbitMQ", "kombu is not installed (the `fleet` extra)")
    try:
        with kombu.Connection(RABBITMQ_URL, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
    except Exception as exc:
        services.missing("RabbitMQ", f"not reachable on 127.0.0.1:5672 (guest/guest): {exc}")
    prefix = new_prefix()

    def cleanup() -> None:
        with kombu.Connection(RABBITMQ_URL, connect_timeout=3) as conn:
            channel = conn.channel()
            for family in FAMILIES:
                try:
                    channel.queue_delete(f"{prefix}.{family}")
                except Exception:
                    channel = conn.channel()  # a failed delete closes the channel
            try:
                channel.exchange_delete(prefix)
            except Exception:
                pass

    return RABBITMQ_URL, prefix, cleanup


class WorkerProc:
    """An ``easel worker`` subprocess with its own data directory and log."""

    def __init__(self, data_dir: Path, broker: str, database_url: str, env: dict, queues: str | None = None,
                 name: str = "worker", extra_args: tuple[str, ...] = ()):
        self.data_dir = data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir / f"{name}.log"
        self.args = [sys.executable, "-m", "easel", "worker", "--broker", broker, "--data-dir", str(data_dir),
                     "--database-url", database_url, "--model-source", "tiny"]
        if queues:
            self.args += ["--queues", queues]
        self.args += list(extra_args)
        self.env = {**os.environ, **env}
        self.proc: subprocess.Popen | None = None
        self._offset = 0

    def start(self, timeout: float = 120) -> "WorkerProc":
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.wait_log(r"\bready\.", timeout)
        return self

    @property
    def worker_id(self) -> str:
        """The id this process writes into the tasks it holds (``celery-<host>-<pid>``)."""
        return f"celery-{socket.gethostname()[:40]}-{self.proc.pid}"

    def log(self) -> str:
        """What this process (the latest start) logged."""
        with open(self.log_path, errors="replace") as fh:
            fh.seek(self._offset)
            return fh.read()

    def wait_log(self, pattern: str, timeout: float = 60) -> re.Match:
        deadline = time.time() + timeout * TIME_SCALE
        while time.time() < deadline:
            found = re.search(pattern, self.log())
            if found:
                return found
            assert self.proc.poll() is None, f"worker exited ({self.proc.returncode}):\n{self.log()[-3000:]}"
            time.sleep(0.2)
        raise AssertionError(f"worker never logged {pattern!r}:\n{self.log()[-3000:]}")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(20)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
