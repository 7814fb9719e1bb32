"""Submit throughput and queue-to-start latency: the single box against the fleet.

Setups (tiny models, every process on this machine):

- ``box-sqlite``: ``easel serve`` as shipped (SQLite, local executor);
- ``box-postgres``: the same on a fresh PostgreSQL database;
- ``fleet``: ``easel serve --workers 0 --executor celery`` (PostgreSQL, Redis broker) and one
  ``easel worker``; ``fleet-2api``: two such API processes, the clients split between them.

Measured:

- **submit throughput**: ``--runs`` Runs of a small SD request sent by ``--clients`` concurrent
  clients (API-key auth) to API processes with no worker consuming (queued tasks pile up, so the
  numbers are the API path alone: parse, validate, store, and for the fleet publish the id):
  Runs answered per second and the median / p95 answer time;
- **queue-to-start latency**: ``--tasks`` one-step tasks sent one at a time to an idle worker;
  from the task's ``createtime`` (stored) to ``accepttime`` (a worker claimed it: the executor's
  delivery) and to ``starttime`` (inference began), read from the store.

Needs PostgreSQL (127.0.0.1:5432, trust) and Redis (127.0.0.1:6379) for the fleet rows.
Run: ``.venv/bin/python bench/bench_fleet.py [--runs 200] [--clients 8] [--tasks 20]``.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from common import free_port  # noqa: E402

TOOL = "wiro/text-to-image-sd-lora"
SMALL = {"selectedLoraModel": [], "samples": 1, "steps": 1, "width": 64, "height": 64, "seed": "1", "prompt": "a fish"}
PG_ADMIN = "host=127.0.0.1 user=postgres dbname=postgres"


@contextmanager
def postgres() -> Iterator[str]:
    import psycopg

    admin = psycopg.connect(PG_ADMIN, autocommit=True)
    name = f"easel_bench_{secrets.token_hex(4)}"
    admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1/{name}"
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


@contextmanager
def redis_prefix() -> Iterator[str]:
    import redis

    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    prefix = f"bench{secrets.token_hex(3)}"
    try:
        yield prefix
    finally:
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()


@contextmanager
def process(args: list[str], env: dict, ready) -> Iterator[subprocess.Popen]:
    """Run ``easel ARGS`` until ``ready()`` is true; stop it afterwards."""
    proc = subprocess.Popen([sys.executable, "-m", "easel", *args], env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not ready():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"easel {' '.join(args)} did not start")
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)


def healthy(base: str):
    def check() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
    return check


@contextmanager
def setup(kind: str, workers: int, root: Path) -> Iterator[tuple[list[str], str]]:
    """The API base URLs of a setup and its database URL; ``workers`` workers consume."""
    data = root / f"{kind}-{workers}-{secrets.token_hex(2)}"
    with ExitStack() as stack:
        env: dict = {}
        serve = ["serve", "--data-dir", str(data), "--model-source", "tiny"]
        if kind == "box-sqlite":
            url = f"sqlite:///{data / 'easel.db'}"
        else:
            url = stack.enter_context(postgres())
        env["EASEL_DATABASE_URL"] = url
        if kind.startswith("fleet"):
            env["EASEL_QUEUE_PREFIX"] = stack.enter_context(redis_prefix())
            serve += ["--executor", "celery", "--workers", "0"]
        else:
            serve += ["--workers", str(workers)]
        bases = []
        for _ in range(2 if kind == "fleet-2api" else 1):
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            stack.enter_context(process([*serve, "--port", str(port)], env, healthy(base)))
            bases.append(base)
        if kind.startswith("fleet") and workers:
            log = data / "worker.log"
            started = lambda: log.exists() and " ready." in log.read_text(errors="replace")  # noqa: E731
            cmd = [sys.executable, "-m", "easel", "worker", "--data-dir", str(data / "worker"), "--model-source", "tiny"]
            proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=open(log, "w"), stderr=subprocess.STDOUT)
            stack.callback(lambda: (proc.terminate(), proc.wait(30)))
            deadline = time.time() + 300
            while not started():
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"easel worker did not start:\n{log.read_text()[-2000:]}")
                time.sleep(0.2)
        yield bases, url


def api_key(url: str, data: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "easel", "projects", "create", "bench", "--auth", "apikey", "--json",
                          "--data-dir", str(data)], env={**os.environ, "EASEL_DATABASE_URL": url},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["apikey"]


def submit_throughput(bases: list[str], key: str, runs: int, clients: int) -> dict:
    http = httpx.Client(headers={"x-api-key": key}, timeout=120, limits=httpx.Limits(max_connections=clients))

    def one(i: int) -> float:
        t0 = time.perf_counter()
        r = http.post(f"{bases[i % len(bases)]}/v1/Run/{TOOL}", json={**SMALL, "seed": str(i)})
        assert r.json()["result"], r.text
        return time.perf_counter() - t0

    for i in range(5):  # warm-up: connections, first queries
        one(i)
    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        times = sorted(pool.map(one, range(runs)))
    wall = time.perf_counter() - began
    http.close()
    return {"runs_per_s": runs / wall, "median_ms": 1000 * statistics.median(times),
            "p95_ms": 1000 * times[int(0.95 * (len(times) - 1))]}


def queue_to_start(base: str, key: str, url: str, tasks: int) -> dict:
    from easel.store import Store

    store = Store(url)
    http = httpx.Client(headers={"x-api-key": key}, timeout=120)
    accept, start = [], []
    for i in range(tasks + 2):  # the first two load the model
        answer = http.post(f"{base}/v1/Run/{TOOL}", json={**SMALL, "seed": str(i)}, headers={"Prefer": "wait=60"}).json()
        view = answer["tasklist"][0]
        while view["status"] not in ("task_postprocess_end", "task_cancel"):  # the first writes the tiny models
            time.sleep(0.5)
            view = http.post(f"{base}/v1/Task/Detail", json={"taskid": answer["taskid"]}).json()["tasklist"][0]
        assert view["pexit"] == "0", view
        task = store.get_task(int(answer["taskid"]))
        if i >= 2:
            accept.append(task.accepttime - task.createtime)
            start.append(task.starttime - task.createtime)
        time.sleep(0.3)  # the worker is idle (waiting for work) when the next one arrives
    http.close()
    store.engine.dispose()
    ms = lambda xs: 1000 * statistics.median(xs)  # noqa: E731
    p90 = lambda xs: 1000 * sorted(xs)[int(0.9 * (len(xs) - 1))]  # noqa: E731
    return {"accept_median_ms": ms(accept), "accept_p90_ms": p90(accept), "start_median_ms": ms(start),
            "start_p90_ms": p90(start)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--tasks", type=int, default=20)
    ap.add_argument("--only", default="", help="comma-separated setups (default: all)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="easel-bench-fleet-"))
    kinds = [k for k in ("box-sqlite", "box-postgres", "fleet", "fleet-2api") if not args.only or k in args.only]
    print(f"load average before: {os.getloadavg()}")
    for kind in kinds:
        with setup(kind, 0, root) as (bases, url):
            key = api_key(url, root / "keys")
            result = submit_throughput(bases, key, args.runs, args.clients)
        print(f"submit {kind:13s} {args.runs} runs, {args.clients} clients: {result['runs_per_s']:.1f} Runs/s, "
              f"median {result['median_ms']:.1f} ms, p95 {result['p95_ms']:.1f} ms  (load {os.getloadavg()[0]:.1f})")
    for kind in [k for k in kinds if k != "fleet-2api"]:
        with setup(kind, 1, root) as (bases, url):
            key = api_key(url, root / "keys")
            result = queue_to_start(bases[0], key, url, args.tasks)
        print(f"queue->start {kind:13s} {args.tasks} tasks: accept median {result['accept_median_ms']:.1f} ms "
              f"(p90 {result['accept_p90_ms']:.1f}), task_start median {result['start_median_ms']:.1f} ms "
              f"(p90 {result['start_p90_ms']:.1f})  (load {os.getloadavg()[0]:.1f})")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
