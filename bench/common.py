"""Shared benchmark helpers: a real ``easel serve`` in a temporary data dir, and Run-to-done timing."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BenchServer:
    """A running server and an API-key client for it."""

    def __init__(self, base: str, client: httpx.Client):
        self.base = base
        self.client = client

    def run_to_done(self, tool: str, params: dict, poll: float = 0.02, mode: str = "poll") -> tuple[float, float, dict]:
        """Submit ``params`` to ``tool`` and wait for the end: ``poll`` Task/Detail every ``poll``
        seconds, or ``wait``: one Run with ``Prefer: wait=60`` (the server watches the store).

        Returns:
            (submit latency s, Run → task_postprocess_end s, the final task object).
        """
        t0 = time.time()
        if mode == "wait":
            answer = self.client.post(f"{self.base}/v1/Run/{tool}", json=params, headers={"Prefer": "wait=60"}).json()
            task = answer["tasklist"][0]
            assert task["pexit"] == "0", task["debugerror"]
            return 0.0, time.time() - t0, task
        answer = self.client.post(f"{self.base}/v1/Run/{tool}", json=params).json()
        submit = time.time() - t0
        while True:
            task = self.client.post(f"{self.base}/v1/Task/Detail", json={"taskid": answer["taskid"]}).json()["tasklist"][0]
            if task["status"] in ("task_postprocess_end", "task_cancel"):
                break
            time.sleep(poll)
        assert task["pexit"] == "0", task["debugerror"]
        return submit, time.time() - t0, task

    def wait(self, taskid: str, poll: float = 0.05) -> dict:
        """Poll Task/Detail until the task ends; return it."""
        while True:
            task = self.client.post(f"{self.base}/v1/Task/Detail", json={"taskid": taskid}).json()["tasklist"][0]
            if task["status"] in ("task_postprocess_end", "task_cancel"):
                return task
            time.sleep(poll)


def fullsize_sd15_data_dir(prefix: str, weights: Path | None = None) -> tuple[Path, Path]:
    """A new data directory whose ``--model-source random`` SD 1.5 is full size: ``weights`` (an
    ``sd15-full`` folder ``make_random`` wrote before) linked in, else one written there (4.3 GB,
    about 30 s). Returns ``(data directory, the sd15-full folder)``."""
    import tempfile

    data = Path(tempfile.mkdtemp(prefix=prefix))
    random_dir = data / "models" / "random"
    random_dir.mkdir(parents=True)
    if weights:
        (random_dir / "sd15-full").symlink_to(weights.resolve())
    else:
        from easel.synthetic.fullsize import make_random

        make_random(random_dir, "sd15", "full")
    return data, random_dir / "sd15-full"


@contextmanager
def serve(data: Path, *args: str, env: dict | None = None) -> Iterator[BenchServer]:
    """Start ``easel serve`` on ``data`` (tiny models unless ``args`` say otherwise; ``env``: extra
    environment variables) and yield a :class:`BenchServer`."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "easel", "serve", "--port", str(port), "--data-dir", str(data), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        out = subprocess.run([sys.executable, "-m", "easel", "projects", "create", "bench", "--data-dir", str(data),
                              "--auth", "apikey", "--json"], capture_output=True, text=True, check=True)
        client = httpx.Client(headers={"x-api-key": json.loads(out.stdout)["apikey"]}, timeout=60)
        yield BenchServer(base, client)
    finally:
        proc.terminate()
        proc.wait(20)
