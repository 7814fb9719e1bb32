"""Cost of a ``/metrics`` scrape, and of recording one HTTP request's metrics.

Builds a SQLite store with ``--tasks`` tasks (a few queued and running, the rest finished, over
the catalog's tools), fills a prometheus multiprocess folder with the samples of ``--processes``
processes, then times (a) the store-read queue/running gauges (one grouped query), (b) the whole
exposition as ``/metrics`` produces it, and (c) ``easel.metrics.http_request`` (what the HTTP
middleware adds to every request). Run: ``.venv/bin/python bench/bench_metrics.py [--tasks 100000]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def fill_store(url: str, n: int) -> None:
    from sqlalchemy import insert

    from easel.store import Store, Task

    store = Store(url)
    store.migrate()
    tools = ["wiro/text-to-image-sd-lora", "wiro/text-to-image-flux-lora-fast", "Adel_AI/Comics-Factory-v1"]
    now = time.time()
    rows = []
    for i in range(n):
        status = "task_queue" if i % 1000 == 0 else "task_output" if i % 1000 == 1 else "task_postprocess_end"
        rows.append(dict(uuid=f"u{i}", project_id=1, tool=tools[i % 3], socketaccesstoken=f"s{i}",
                         file_accesskey=f"f{i}", status=status, parameters="{}", inputs="{}", callbackurl="",
                         debugoutput="", debugerror="", progress="", cost_per_second=0.0, kill_requested=False,
                         worker_id="", createtime=now))
    with store.engine.begin() as conn:
        for start in range(0, n, 5000):
            conn.execute(insert(Task), rows[start:start + 5000])


def record(folder: str, processes: int) -> None:
    """Samples as ``processes`` worker processes would leave them (each its own files)."""
    code = ("from easel import metrics as m\n"
            "for t in ('wiro/text-to-image-sd-lora', 'wiro/text-to-image-flux-lora-fast'):\n"
            "    for o in ('succeeded', 'failed', 'killed'):\n"
            "        m.TASKS.labels(t, o).inc(); m.QUEUE_WAIT.labels(t, o).observe(1); m.RUN_TIME.labels(t, o).observe(5)\n"
            "m.model_loaded('sd15:tiny-sd15', 2.0); m.cache_bytes(10**9)\n"
            "for r in ('/v1/Run/{owner}/{slug}', '/v1/Task/Detail'):\n"
            "    m.http_request(r, 'POST', 200, 0.01)\n")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": folder}
    for _ in range(processes):
        subprocess.run([sys.executable, "-c", code], env=env, check=True)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--processes", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="easel-bench-metrics-"))
    folder = work / "metrics"
    folder.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)  # before prometheus_client is imported
    url = f"sqlite:///{work / 'easel.db'}"
    fill_store(url, args.tasks)
    record(str(folder), args.processes)

    from prometheus_client import CollectorRegistry

    from easel import metrics
    from easel.api.metrics import StoreCollector, exposition
    from easel.store import Store

    store = Store(url)
    tools = ["wiro/text-to-image-sd-lora", "wiro/text-to-image-flux-lora-fast", "Adel_AI/Comics-Factory-v1"]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store, tools))
    gauges = timed(lambda: list(StoreCollector(store, tools).collect()), args.repeats)
    scrape = timed(lambda: exposition(registry), args.repeats)
    size = len(exposition(registry))
    n = 10_000
    began = time.perf_counter()
    for _ in range(n):
        metrics.http_request("/v1/Task/Detail", "POST", 200, 0.001)
    per_request = (time.perf_counter() - began) / n
    print(f"{args.tasks} tasks in the store, {args.processes} processes' sample files, median of {args.repeats}")
    print(f"store-read gauges (grouped query): {gauges * 1000:.2f} ms")
    print(f"whole /metrics exposition: {scrape * 1000:.2f} ms ({size} bytes)")
    print(f"recording one HTTP request (counter + histogram, multiprocess): {per_request * 1e6:.1f} us")


if __name__ == "__main__":
    main()
