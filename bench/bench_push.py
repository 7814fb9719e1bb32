"""Time from an event's commit to its arrival at a WebSocket, with pushed wake-ups against polling.

Two ``easel serve`` on one store, as in a fleet: API 1 runs one worker (tiny SD 1.5, CPU), API 2
runs none (``--workers 0``) and serves the sockets, so every event crosses processes. For each
mode, ``--tasks`` tasks of ``--steps`` denoising steps are followed on API 2's socket; for every
event written after the socket registered, latency = arrival time at the client minus the event's
``created_at`` (stamped in the inserting transaction, which commits right after). Modes:

- ``redis``: ``EASEL_LIVE_PUSH=redis`` (pub/sub), PostgreSQL store;
- ``postgres``: ``EASEL_LIVE_PUSH=postgres`` (``LISTEN/NOTIFY``);
- ``poll-postgres``: ``EASEL_LIVE_PUSH=off``, the socket's adaptive poll (20 ms near events,
  backing off to 250 ms), PostgreSQL store;
- ``poll-sqlite``: the single-box default (SQLite, polling).

Run: ``.venv/bin/python bench/bench_push.py [--tasks 5] [--steps 20] [--size 128] [--modes redis,...]``
(PostgreSQL on 127.0.0.1:5432 as user ``postgres``, Redis on 127.0.0.1:6379; a mode whose service
is absent is skipped with the reason). Each mode gets a fresh database and its own Redis prefix.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import httpx
from websockets.sync.client import connect

sys.path.insert(0, str(Path(__file__).parent))
from common import free_port  # noqa: E402

ADMIN = "host=127.0.0.1 user=postgres dbname=postgres"
REDIS = "redis://127.0.0.1:6379/0"
TOOL = "wiro/text-to-image-sd-lora"
MODES = ("redis", "postgres", "poll-postgres", "poll-sqlite")


@contextmanager
def database() -> Iterator[str]:
    import psycopg

    admin = psycopg.connect(ADMIN, autocommit=True, connect_timeout=3)
    name = f"easel_bench_{os.getpid()}_{secrets.token_hex(3)}"
    admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1/{name}"
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


@contextmanager
def server(data: Path, env: dict, *args: str) -> Iterator[str]:
    port = free_port()
    log = open(data / f"serve-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "easel", "serve", "--port", str(port), "--data-dir", str(data),
                             "--model-source", "tiny", *args], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **env})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError((data / f"serve-{port}.log").read_text()[-2000:])
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def wait_pushing(base: str, backend: str, timeout: float = 30) -> None:
    line = f'easel_live_push_connected{{backend="{backend}"}} 1.0'
    deadline = time.time() + timeout
    while line not in httpx.get(f"{base}/metrics", timeout=10).text:
        if time.time() > deadline:
            raise RuntimeError(f"the {backend} listener of {base} did not connect")
        time.sleep(0.2)


def follow(base: str, token: str) -> tuple[float, list[tuple[str, float]]]:
    """(registration time, [(frame type, arrival time)]) of one task's socket."""
    out = []
    with connect(base.replace("http", "ws") + "/v1", open_timeout=10) as ws:
        ws.send(json.dumps({"type": "task_info", "tasktoken": token}))
        registered = time.time()
        while True:
            frame = json.loads(ws.recv(timeout=300))
            out.append((frame["type"], time.time()))
            if frame["type"] in ("task_postprocess_end", "task_cancel"):
                return registered, out


def run_mode(mode: str, tasks: int, steps: int, size: int) -> list[float]:
    from easel.config import Settings
    from easel.store import SecretBox, Store

    with ExitStack() as stack:
        data = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"easel-bench-push-{mode}-")))
        env = {"EASEL_LIVE_PUSH": "off" if mode.startswith("poll") else mode}
        url = Settings(data_dir=data).core.database_url
        if mode != "poll-sqlite":
            url = stack.enter_context(database())
            env["EASEL_DATABASE_URL"] = url
        if mode == "redis":
            env |= {"EASEL_REDIS_URL": REDIS, "EASEL_REDIS_PREFIX": f"easel-bench-{secrets.token_hex(4)}"}
        store = Store(url, secrets=SecretBox.for_settings(Settings(data_dir=data, database_url=url).core))  # the servers' key
        store.migrate()
        project = store.create_project("bench", "apikey")
        api1 = stack.enter_context(server(data, env))  # API + one worker
        api2 = stack.enter_context(server(data, env, "--workers", "0"))  # API only: follows the sockets
        if not mode.startswith("poll"):
            wait_pushing(api2, mode)
        http = httpx.Client(headers={"x-api-key": project.apikey}, timeout=120)
        params = {"prompt": "a red fish", "steps": steps, "width": size, "height": size, "samples": 1, "seed": "1",
                  "selectedLoraModel": []}
        http.post(f"{api1}/v1/Run/{TOOL}", json=params, headers={"Prefer": "wait=60"})  # warm the pipeline
        latencies: list[float] = []
        for _ in range(tasks):
            # a task ahead keeps the worker busy while the socket registers on the followed one
            http.post(f"{api2}/v1/Run/{TOOL}", json={**params, "steps": 5})
            answer = http.post(f"{api2}/v1/Run/{TOOL}", json=params).json()
            registered, frames = follow(api2, answer["socketaccesstoken"])
            events = [e for e in store.events(int(answer["taskid"]))
                      if not (e.type == "task_error_full" and not e.message)]
            assert [e.type for e in events] == [t for t, _ in frames]
            latencies += [arrived - e.created_at for e, (_, arrived) in zip(events, frames) if e.created_at > registered]
        store.engine.dispose()
        return latencies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=128, help="image side; at 64² a step is so short that the "
                    "poll stays at its 20 ms near-the-end rate")
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    print(f"{args.tasks} tasks × {args.steps} steps (tiny SD 1.5, {args.size}², CPU) per mode; events written after the "
          "socket registered\n")
    print("| mode | events | median | p95 | max |")
    print("|---|---|---|---|---|")
    for mode in args.modes.split(","):
        try:
            lat = sorted(run_mode(mode, args.tasks, args.steps, args.size))
        except Exception as exc:  # a service that is absent: say so, go on
            print(f"| {mode} | skipped: {str(exc).splitlines()[0][:100]} | | | |")
            continue
        p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
        print(f"| {mode} | {len(lat)} | {statistics.median(lat) * 1000:.1f} ms | {p95 * 1000:.1f} ms | "
              f"{lat[-1] * 1000:.1f} ms |", flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
