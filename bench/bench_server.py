"""The server's own cost (issue 14), every row in one run and one table.

Rows (each measured for this source tree, "B", and, with ``--base DIR``, for another version's
source tree, "A", interleaved with B so that both see the same load on a shared machine):

- **worker**: in one process with one torch thread, the raw diffusers call on the tool's own
  pipeline and LoRA, then the same plus the version's PNG encoding ("raw+png"), then the same
  inputs as a task through the real worker (``Worker.run_next``: claim, lifecycle, steps,
  previews, PNGs, outputs), alternately; pairwise ratios (Easel / raw+png, Easel / raw), the
  fixed cost (Easel − raw+png on a tiny task) and sub-second stage times from the task's events.
  Cases: SD 1.5 tool and FLUX tool at the seeds' sizes, and a tiny SD task (64², 2 steps).
- **micro**: one per-step progress write, one lifecycle transition, four 512² PNGs of noise,
  ``LoraState.apply`` asked for the active LoRA again.
- **api**: ``POST /v1/Run`` and ``/v1/Task/Detail`` at 50 connections with ``wrk`` (the most
  the server answers) and ``hey -q`` (a fixed offered rate: the latency at 1000 and 2000/s;
  Debian's ``wrk`` and ``hey`` packages, a Python load generator when they are missing),
  servers with ``--workers 0`` (the API's own capacity),
  one API process and, for B, ``--api-processes 2``; requests/s, p50, p99.
- **list**: ``Task/List`` (20 newest) and a queued task's ``Task/Detail`` view in a store of
  100 000 tasks, with 1 % queued and with all of them queued (the last one asked for), in process.
- **poll**: a real server with one worker; the denoising time of a task (``task_start`` → its
  last step, from the events) while a client polls Task/Detail every 20 ms, against a client
  that looks every 0.5 s; with the worker's automatic torch threads and with 2.

Run: ``.venv/bin/python bench/bench_server.py [--base DIR] [--quick] [--only worker,micro,api,list,poll]``
(``git archive main | tar -x -C DIR`` makes a base tree). Load from other processes changes
absolute numbers; the A/B columns were taken in the same minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SD, FLUX = "wiro/text-to-image-sd-lora", "wiro/text-to-image-flux-lora-fast"


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(code: Path | None) -> dict:
    """The environment of a process running the Easel source tree ``code`` (None: this tree)."""
    env = {**os.environ, "PYTHONPATH": str(code or ROOT)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


# -- child processes: one per version, driven line by line --------------------------------------

class Child:
    """``bench_server.py --child KIND`` in a process of its own on one source tree; ``ask`` sends a
    JSON command and returns its JSON answer."""

    def __init__(self, kind: str, code: Path | None, args: list[str]):
        self.log = Path(tempfile.mkstemp(prefix=f"easel-bench-{kind}-", suffix=".log")[1])
        self.proc = subprocess.Popen([sys.executable, str(HERE / "bench_server.py"), "--child", kind, *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log.open("w"),
                                     text=True, env=env_for(code), cwd=str(HERE))
        self.ready = self._read()

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"benchmark child process exited: {self.log.read_text()[-3000:]}")
            if line.startswith("@@"):
                return json.loads(line[2:])

    def ask(self, command: dict) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(30)
        except Exception:
            self.proc.kill()


def answer(obj: dict) -> None:
    sys.stdout.write("@@" + json.dumps(obj) + "\n")
    sys.stdout.flush()


def child_loop(handler) -> None:
    answer({"ready": True})
    for line in sys.stdin:
        if line.strip():
            answer(handler(json.loads(line)))


# -- worker overhead (child) ------------------------------------------------------------------------

WORKER_CASES = {
    # the seeds' own inputs (their default LoRAs included)
    "sd-seed": (SD, {"prompt": "a lighthouse", "samples": 4, "steps": 30, "width": 512, "height": 512, "seed": "7"}),
    "flux-seed": (FLUX, {"prompt": "a lion", "samples": 1, "steps": 20, "width": 1024, "height": 1024, "seed": "7"}),
    "tiny": (SD, {"prompt": "a fish", "samples": 1, "steps": 2, "width": 64, "height": 64, "seed": "7"}),
}
QUICK_CASES = {
    "sd-seed": (SD, {"prompt": "a lighthouse", "samples": 2, "steps": 10, "width": 256, "height": 256, "seed": "7"}),
    "flux-seed": (FLUX, {"prompt": "a lion", "samples": 1, "steps": 4, "width": 256, "height": 256, "seed": "7"}),
    "tiny": WORKER_CASES["tiny"],
}


class RawCall:
    """The tool's diffusers call, made directly on the very pipeline the worker's tool uses (the same
    weight tensors, the LoRA the task left active: what a diffusers user holding that pipeline would
    call), optionally followed by the version's PNG encoding."""

    def __init__(self, tool: str, params: dict, models, catalog):
        from easel.catalog import load_tools

        self.inputs = load_tools()[tool].validate(params, catalog)
        self.flux = tool == FLUX
        family = "flux:" if self.flux else "sd15:"
        keys = [k for k in models.pipelines.keys() if k.startswith(family) and "+" not in k]
        self.pipe = models.pipelines.peek(keys[-1])

    def __call__(self, out: Path | None) -> tuple[float, float, float]:
        """(seconds of the pipeline call, seconds of the PNG encoding (0 without ``out``), CPU seconds
        of this process over both)."""
        import torch

        from easel.tools.base import write_pngs

        i = self.inputs
        n = int(i["samples"])
        kw = dict(num_images_per_prompt=n, num_inference_steps=int(i["steps"]),
                  guidance_scale=float(i["scale"]), width=int(i["width"]), height=int(i["height"]),
                  generator=[torch.Generator("cpu").manual_seed(7 + k) for k in range(n)])
        cpu = time.process_time()
        t = time.perf_counter()
        clip_skip = 0 if self.flux else int(i.get("clipSkip", 0))
        if clip_skip > 0:  # what the tool does (diffusers' own clip_skip needs CLIPTextModel.text_model)
            from easel.tools.sd_lora import encode_prompt

            kw["prompt_embeds"] = encode_prompt(self.pipe, [i["prompt"]], clip_skip)
            kw["negative_prompt_embeds"] = encode_prompt(self.pipe, [i.get("negativePrompt", "")], clip_skip)
        else:
            kw["prompt"] = i["prompt"]
            if not self.flux:
                kw["negative_prompt"] = i.get("negativePrompt") or None
        images = self.pipe(**kw).images
        call = time.perf_counter() - t
        if out is None:
            return call, 0.0, time.process_time() - cpu
        t = time.perf_counter()
        write_pngs(images, out, 7, lambda s: "", {})
        return call, time.perf_counter() - t, time.process_time() - cpu


def attribute_cpu() -> dict:
    """Count this process's CPU time inside the model work a raw diffusers user does too (the
    pipelines' ``__call__``, the SD tool's clip-skip prompt encoding, the PNG encoding) as
    ``model``, and inside Easel's work that runs within those calls (per-step progress writes and
    latent previews, called back from the denoising loop) as ``own``: a task's own CPU is then its
    total − (model − own), attributed within the same task, so the pipeline's run-to-run
    variation does not enter it (the A/B difference against a separate raw call does)."""
    import functools
    import importlib

    import diffusers

    from easel.tasks import runner

    acc = {"model": 0.0, "own": 0.0}

    def counted(owner, name: str, bucket: str) -> None:
        fn = getattr(owner, name, None)
        if fn is None:  # another version of the tree may not have it
            return

        @functools.wraps(fn)
        def wrapper(*a, **k):
            c = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                acc[bucket] += time.process_time() - c
        setattr(owner, name, wrapper)

    for cls in (diffusers.StableDiffusionPipeline, diffusers.FluxPipeline):
        counted(cls, "__call__", "model")
    # the modules whose globals the tools' runs call these through: since issue 22 the FLUX tool's
    # run is ``tools/common.py``'s ``run_flux`` (its PNGs went uncounted as model work before)
    for name in ("sd_lora", "flux_lora", "common"):
        try:
            module = importlib.import_module(f"easel.tools.{name}")
        except ImportError:  # another version of the tree may not have it
            continue
        counted(module, "encode_prompt", "model")
        counted(module, "write_pngs", "model")
        counted(module, "latent_to_jpeg", "own")
    counted(runner.WorkerContext, "progress", "own")
    return acc


def child_worker(quick: bool) -> None:
    import torch

    torch.set_num_threads(1)
    from easel.catalog import load_tools
    from easel.config import Settings
    from easel.tasks import lifecycle as lc
    from easel.tasks.runner import Worker

    data = Path(tempfile.mkdtemp(prefix="easel-bench-worker-"))
    settings = Settings(data_dir=data)
    worker = Worker(settings, "bench-worker")
    store = worker.store
    store.migrate()
    project = store.create_project("bench", "apikey")
    cases = QUICK_CASES if quick else WORKER_CASES
    raws: dict[str, RawCall] = {}
    out = data / "raw-out"
    out.mkdir()

    inner = attribute_cpu()

    def submit(tool: str, params: dict) -> int:
        spec = load_tools()[tool]
        task, _ = lc.submit(store, project_id=project.id, tool=tool, parameters=params,
                            inputs=spec.validate(params, worker.catalog), callbackurl="", cost_per_second=0)
        return task.id

    def easel_run(tool: str, params: dict) -> dict:
        """Submit → the ``task_postprocess_end`` event (what a client waits for), the worker taking
        the task at once (as an idle worker woken by the submit does)."""
        inner.update(model=0.0, own=0.0)
        t, cpu = time.time(), time.process_time()
        tid = submit(tool, params)
        assert worker.run_next() == tid
        cpu = time.process_time() - cpu
        own_cpu = cpu - (inner["model"] - inner["own"])  # Easel's own work, attributed within this task
        task = store.get_task(tid)
        assert task.status == lc.POSTPROCESS_END and task.pexit == "0", task.debugerror
        ev = store.events(tid)
        at = {e.type: e.created_at for e in ev}  # the last event of each type
        steps = [e.created_at for e in ev if e.type == lc.OUTPUT]
        from sqlalchemy import inspect, text

        with store.engine.connect() as conn:  # where the version keeps previews: in events, or apart
            if "previews" in inspect(conn).get_table_names():
                shots = conn.execute(text("SELECT sum(length(data)) FROM previews WHERE task_id = :t"), {"t": tid})
            else:
                shots = conn.execute(text("SELECT sum(length(preview)) FROM events WHERE task_id = :t"), {"t": tid})
            preview_bytes = shots.scalar() or 0
            event_bytes = conn.execute(text("SELECT sum(length(message)) FROM events WHERE task_id = :t"),
                                       {"t": tid}).scalar() or 0
        return {"easel": at[lc.POSTPROCESS_END] - t, "easel_cpu": cpu, "own_cpu": own_cpu, "step_cpu": inner["own"],
                "preview_kb": preview_bytes / 1024,
                "events_kb": event_bytes / 1024, "to_start": at[lc.START] - at[lc.ACCEPT], "denoise": steps[-1] - at[lc.START],
                "after_last_step": at[lc.POSTPROCESS_END] - steps[-1]}

    def handler(cmd: dict) -> dict:
        what = cmd["what"]
        if what == "case":
            name = cmd["case"]
            tool, params = cases[name]
            if name not in raws:
                easel_run(tool, params)  # warm-up: the worker loads its pipeline
                raws[name] = RawCall(tool, params, worker.models, worker.catalog)
                raws[name](out)
            raw_call, _, _ = raws[name](None)
            raw_call2, png, raw_cpu = raws[name](out)
            row = easel_run(tool, params)
            return {"raw": raw_call, "raw_png": raw_call2 + png, "png": png, "raw_png_cpu": raw_cpu, **row}
        if what == "micro":
            return micro(store, project, worker)
        raise ValueError(what)

    child_loop(handler)


def micro(store, project, worker) -> dict:
    """Per-step progress write, lifecycle transition, 4 PNGs, LoraState.apply of the active set."""
    import numpy as np
    from PIL import Image

    from easel.tasks import lifecycle as lc
    from easel.tools.base import write_pngs

    task, _ = lc.submit(store, project_id=project.id, tool=SD, parameters={}, inputs={}, callbackurl="",
                        cost_per_second=0)
    tid, owner = task.id, "micro"
    assert lc.claim(store, owner) == tid
    for status in (lc.PREPROCESS_START, lc.PREPROCESS_END, lc.ASSIGN, lc.START):
        lc.advance(store, tid, status, owner=owner)
    info = {"task": "Generate", "percentage": "50", "stepCurrent": "1", "stepTotal": "2", "speed": "1.00",
            "speedType": "it/s", "elapsedTime": "1.0s", "remainingTime": "1.0s"}
    msg = json.dumps({"type": "progressGenerate", **info})
    times = []
    for _ in range(300):
        t = time.perf_counter()
        lc.progress(store, tid, msg, info, owner=owner, lease_seconds=30)
        times.append(time.perf_counter() - t)
    progress_ms = 1000 * statistics.median(times[50:])
    times = []
    for _ in range(100):  # a renewal-free transition of a status to itself is not legal: time a pair
        t = time.perf_counter()
        store.renew_lease(tid, owner, time.time() + 30, lc.RUNNING)
        times.append(time.perf_counter() - t)
    lease_ms = 1000 * statistics.median(times[20:])
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)) for _ in range(4)]
    out = Path(tempfile.mkdtemp(prefix="easel-bench-png-"))
    times = []
    for _ in range(5):
        t = time.perf_counter()
        write_pngs(images, out, 0, lambda s: "", {})
        times.append(time.perf_counter() - t)
    png_ms = 1000 * min(times)
    # LoraState.apply asked for the LoRA that is already active (SD tool, tiny model)
    from easel.tools.sd_lora import load_pipeline

    models, catalog = worker.models, worker.catalog
    pipe = load_pipeline(models.sources.checkpoint(catalog.get("1")))
    w = models.sources.lora(catalog.get("61"))
    state = models.adapters(pipe)
    state.apply(pipe, [(w.key, str(w.path), 0.3)])
    times = []
    for _ in range(10):
        t = time.perf_counter()
        state.apply(pipe, [(w.key, str(w.path), 0.3)])
        times.append(time.perf_counter() - t)
    return {"progress_ms": progress_ms, "lease_ms": lease_ms, "png4_ms": png_ms,
            "lora_same_ms": 1000 * statistics.median(times)}


# -- Task/List and queue position at 100k tasks (child) -------------------------------------------

def fill(store, n: int, queued_every: int) -> int:
    """``n`` tasks of project 1 (one in ``queued_every`` queued, the rest finished), written directly;
    returns the id of the last queued task."""
    from sqlalchemy import inspect, insert, text

    from easel.store import Task

    has_seq = "queue_seq" in {c.key for c in inspect(Task).columns}
    now = time.time()
    rows, last_queued = [], 0
    for i in range(1, n + 1):
        queued = i % queued_every == 0
        row = dict(id=i, uuid=f"u{i}", project_id=1, tool=SD, socketaccesstoken=f"s{i}", file_accesskey=f"f{i}",
                   status="task_queue" if queued else "task_postprocess_end", parameters='{"prompt": "x"}',
                   inputs="{}", callbackurl="", debugoutput="", debugerror="", pexit=None if queued else "0",
                   progress="", cost_per_second=0.0, kill_requested=False, worker_id="", createtime=now,
                   event_seq=1)
        if has_seq:
            row["queue_seq"] = i
        rows.append(row)
        if queued:
            last_queued = i
    with store.engine.begin() as conn:
        for start in range(0, n, 5000):
            conn.execute(insert(Task), rows[start:start + 5000])
        if has_seq:
            conn.execute(text("UPDATE counters SET value = :n WHERE name = 'task_queue_seq'"), {"n": n})
            conn.execute(text("UPDATE projects SET task_count = :n WHERE id = 1"), {"n": n})
    return last_queued


def child_list(n: int) -> None:
    from easel.api.routes.task import list_tasks
    from easel.api.services import Services
    from easel.api.views import task_view
    from easel.config import Settings

    setups = {}
    for name, every in (("1% queued", 100), ("all queued", 1)):
        data = Path(tempfile.mkdtemp(prefix="easel-bench-list-"))
        settings = Settings(data_dir=data)
        api = Services.build(settings, None)
        api.store.migrate()
        project = api.store.create_project("bench", "apikey")
        last = fill(api.store, n, every)
        setups[name] = (api, project, last)

    def timed(fn, repeats=30) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1000 * statistics.median(times)

    def handler(cmd: dict) -> dict:
        out = {}
        for name, (api, project, last) in setups.items():
            task = api.store.get_task(last)
            view = task_view(api, task)
            assert view["queueposition"] == str(n // (100 if name == "1% queued" else 1)), view["queueposition"]
            out[name] = {"list_ms": timed(lambda: list_tasks(api, project, {})),
                         "position_ms": timed(lambda: task_view(api, api.store.get_task(last)))}
        return out

    child_loop(handler)


# -- servers, load, polling (driver) --------------------------------------------------------------

class Server:
    """``easel serve`` of a source tree on a fresh data dir, with a signature project (lenient)."""

    def __init__(self, code: Path | None, *args: str, env: dict | None = None):
        self.data = Path(tempfile.mkdtemp(prefix="easel-bench-srv-"))
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {**env_for(code), **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "easel", "serve", "--port", str(self.port), "--data-dir",
                                      str(self.data), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=self.env, cwd=str(self.data))
        import httpx

        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.base}/healthz", timeout=2).status_code in (200, 503):
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        out = subprocess.run([sys.executable, "-m", "easel", "projects", "create", "bench", "--data-dir",
                              str(self.data), "--json"], capture_output=True, text=True, check=True, env=self.env,
                             cwd=str(self.data))
        self.project = json.loads(out.stdout)
        from easel.signing import signature

        self.headers = {"x-api-key": self.project["apikey"], "x-nonce": "12345",
                        "x-signature": signature(self.project["apikey"], self.project["apisecret"], "12345")}

    def post(self, path: str, body: dict, **kw):
        """POST over one kept-alive connection (as a polling client would; a new ``httpx.Client``
        per request costs the client milliseconds of CPU on the cores the server shares)."""
        import httpx

        if getattr(self, "_client", None) is None:
            self._client = httpx.Client(timeout=60)
        return self._client.post(f"{self.base}{path}", json=body, headers={**self.headers, **kw.pop("headers", {})},
                                 **kw)

    def stop(self) -> None:
        if getattr(self, "_client", None) is not None:
            self._client.close()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.data, ignore_errors=True)


RUN_BODY = {"prompt": "a lake", "samples": 1, "steps": 2, "width": 64, "height": 64, "selectedLoraModel": []}


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` and its descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)  # ppid, utime+stime
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, (0, 0.0))[1]
        todo.extend(c for c, (ppid, _) in stats.items() if ppid == p)
    return total


def load(server: Server, path: str, body: dict, seconds: float, connections: int = 50,
         rate: float | None = None) -> dict:
    """Requests/s, p50 and p99 (ms) of ``path`` from ``connections`` clients, and the server's CPU
    milliseconds per request (all its processes). Without ``rate`` each client sends its next
    request as soon as the last is answered (the most the server does, ``wrk``); with ``rate``
    that many requests per second are offered (``hey -q``, :func:`hey_load`; without hey each
    client waits ``connections / rate`` seconds between requests): the latency at that load."""
    cpu = tree_cpu(server.proc.pid)
    if rate and shutil.which("hey"):
        return hey_load(server, path, body, seconds, connections, rate, cpu)
    if shutil.which("wrk"):
        script = Path(tempfile.mkstemp(suffix=".lua")[1])
        headers = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in
                          {**server.headers, "Content-Type": "application/json"}.items())
        pace = f"function delay() return {1000 * connections / rate:.1f} end\n" if rate else ""
        script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(json.dumps(body))}\n{headers}{pace}')
        out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds:.0f}s", "--latency", "-s", str(script),
                              server.base + path], capture_output=True, text=True).stdout
        script.unlink()
        cpu = tree_cpu(server.proc.pid) - cpu
        requests = re.search(r"(\d+) requests in", out)

        def ms(label: str) -> float | None:
            m = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
            if not m:
                return None
            return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

        rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        return {"rps": float(rps.group(1)) if rps else None, "p50": ms("50%"), "p99": ms("99%"),
                "errors": int(errors.group(1)) if errors else 0, "tool": "wrk",
                "cpu_ms": 1000 * cpu / int(requests.group(1)) if requests else None}
    result = py_load(server, path, body, seconds, connections, rate)
    return {**result, "cpu_ms": 1000 * (tree_cpu(server.proc.pid) - cpu) / max(1, result["n"])}


def hey_load(server: Server, path: str, body: dict, seconds: float, connections: int, rate: float,
             cpu_before: float) -> dict:
    """``rate`` requests/s offered by ``connections`` clients with ``hey -q``: each client sends on
    its own clock (every ``connections / rate`` s), not a fixed pause after each answer, so the
    offered rate does not fall as the server slows (wrk's ``delay()`` would offer less)."""
    payload = Path(tempfile.mkstemp(suffix=".json")[1])
    payload.write_text(json.dumps(body))
    headers = [a for k, v in server.headers.items() for a in ("-H", f"{k}: {v}")]
    out = subprocess.run(["hey", "-z", f"{seconds:.0f}s", "-c", str(connections), "-q", f"{rate / connections:g}",
                          "-m", "POST", "-T", "application/json", *headers, "-D", str(payload), server.base + path],
                         capture_output=True, text=True).stdout
    payload.unlink()
    cpu = tree_cpu(server.proc.pid) - cpu_before
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    n = sum(codes.values())

    def ms(pct: int) -> float | None:
        m = re.search(rf"^\s*{pct}% in ([\d.]+) secs", out, re.M)
        return 1000 * float(m.group(1)) if m else None

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return {"rps": float(rps.group(1)) if rps else None, "p50": ms(50), "p99": ms(99),
            "errors": n - codes.get(200, 0), "tool": "hey", "cpu_ms": 1000 * cpu / n if n else None}


def py_load(server: Server, path: str, body: dict, seconds: float, connections: int, rate: float | None) -> dict:
    """The same measurement with httpx and asyncio (slower than wrk: it shares the cores)."""
    import asyncio

    import httpx

    async def main():
        lat, errors = [], 0
        end = time.perf_counter() + seconds
        async with httpx.AsyncClient(headers=server.headers, timeout=30,
                                     limits=httpx.Limits(max_connections=connections)) as client:
            async def one():
                nonlocal errors
                while time.perf_counter() < end:
                    t = time.perf_counter()
                    try:
                        r = await client.post(server.base + path, json=body)
                    except httpx.TransportError:  # e.g. a kept-alive connection the server had closed:
                        errors += 1                # counted, as wrk counts a socket error, not fatal
                        continue
                    lat.append(time.perf_counter() - t)
                    errors += r.status_code != 200
                    if rate:
                        await asyncio.sleep(connections / rate)
            began = time.perf_counter()
            await asyncio.gather(*[one() for _ in range(connections)])
            return lat, errors, time.perf_counter() - began

    lat, errors, took = asyncio.run(main())
    lat.sort()
    return {"rps": len(lat) / took, "p50": 1000 * lat[len(lat) // 2], "p99": 1000 * lat[int(len(lat) * 0.99)],
            "errors": errors, "tool": "python", "n": len(lat)}


def denoise_seconds(server: Server, taskid: str) -> float:
    """``task_start`` → the last step, from the task's events in the store (sub-second)."""
    import sqlite3

    db = sqlite3.connect(str(server.data / "easel.db"))
    try:
        rows = db.execute("SELECT type, created_at FROM events WHERE task_id = ? ORDER BY seq", (int(taskid),)).fetchall()
    finally:
        db.close()
    start = max(t for k, t in rows if k == "task_start")
    return max(t for k, t in rows if k == "task_output") - start


def poll_pair(server: Server, params: dict) -> tuple[float, float]:
    """Denoising seconds of one task watched every 0.5 s and one polled every 20 ms."""
    out = []
    for every in (0.5, 0.02):
        taskid = server.post("/v1/Run/" + SD, params).json()["taskid"]
        while True:
            task = server.post("/v1/Task/Detail", {"taskid": taskid}).json()["tasklist"][0]
            if task["status"] in ("task_postprocess_end", "task_cancel"):
                break
            time.sleep(every)
        assert task["pexit"] == "0", task["debugerror"]
        out.append(denoise_seconds(server, taskid))
    return out[0], out[1]


# -- the driver -----------------------------------------------------------------------------------

def run_worker(codes: dict, args, rows: list) -> None:
    children = {v: Child("worker", code, ["--quick"] if args.quick else []) for v, code in codes.items()}
    try:
        for case in (QUICK_CASES if args.quick else WORKER_CASES):
            results = {v: [] for v in codes}
            for i in range(args.repeats * (4 if case == "tiny" else 1)):
                pairs = list(children.items())
                for v, child in (pairs if i % 2 == 0 else pairs[::-1]):  # A, B, B, A, A, B, ...
                    results[v].append(child.ask({"what": "case", "case": case}))
            for v, rs in results.items():
                rows.append({"section": "worker", "case": case, "version": v,
                             "raw_s": med(r["raw"] for r in rs), "raw_png_s": med(r["raw_png"] for r in rs),
                             "png_s": med(r["png"] for r in rs), "easel_s": med(r["easel"] for r in rs),
                             "ratio_png": med(r["easel"] / r["raw_png"] for r in rs),
                             "ratio_raw": med(r["easel"] / r["raw"] for r in rs),
                             "fixed_ms": 1000 * med(r["easel"] - r["raw_png"] for r in rs),
                             "fixed_cpu_ms": 1000 * med(r["easel_cpu"] - r["raw_png_cpu"] for r in rs),
                             "own_cpu_ms": 1000 * med(r.get("own_cpu") for r in rs),
                             "own_fixed_cpu_ms": 1000 * med(r["own_cpu"] - r["step_cpu"] for r in rs),
                             "ratio_cpu": med(r["easel_cpu"] / r["raw_png_cpu"] for r in rs),
                             "to_start_ms": 1000 * med(r["to_start"] for r in rs),
                             "after_last_step_ms": 1000 * med(r["after_last_step"] for r in rs),
                             "preview_kb": med(r["preview_kb"] for r in rs), "events_kb": med(r["events_kb"] for r in rs),
                             "n": len(rs)})
        for v, child in children.items():
            rows.append({"section": "micro", "version": v, **child.ask({"what": "micro"})})
    finally:
        for child in children.values():
            child.close()


def run_api(codes: dict, args, rows: list) -> None:
    variants = [(v, code, 1) for v, code in codes.items()] + [("B", None, 2)]
    servers = {}
    try:
        for v, code, procs in variants:
            extra = ("--api-processes", str(procs)) if procs > 1 else ()
            servers[(v, procs)] = srv = Server(code, "--workers", "0", *extra)
            srv.detail_id = srv.post("/v1/Run/" + SD, RUN_BODY).json()["taskid"]
        kinds = {"Run": ("/v1/Run/" + SD, RUN_BODY, None), "Detail": ("/v1/Task/Detail", None, None),
                 "Run at 1000/s": ("/v1/Run/" + SD, RUN_BODY, 1000), "Detail at 2000/s": ("/v1/Task/Detail", None, 2000)}
        results = {k: {kind: [] for kind in kinds} for k in servers}
        for round_ in range(args.rounds):
            # interleaved: every variant in every round, in the reverse order every other round, so
            # that a drift of the machine's load (or of the load generator) favours no variant
            order = list(servers.items())
            for key, srv in (order if round_ % 2 == 0 else order[::-1]):
                for kind, (path, body, rate) in kinds.items():
                    results[key][kind].append(load(srv, path, body or {"taskid": srv.detail_id}, args.seconds,
                                                   rate=rate))
        for (v, procs), res in results.items():
            for kind, rs in res.items():
                rows.append({"section": "api", "version": v, "processes": procs, "endpoint": kind,
                             "rps": med(r["rps"] for r in rs), "p50_ms": med(r["p50"] for r in rs),
                             "p99_ms": med(r["p99"] for r in rs), "errors": sum(r["errors"] for r in rs),
                             "cpu_ms": med(r["cpu_ms"] for r in rs),
                             "runs": [round(r["rps"] or 0) for r in rs], "tool": rs[0]["tool"]})
    finally:
        for srv in servers.values():
            srv.stop()


def run_list(codes: dict, args, rows: list) -> None:
    children = {v: Child("list", code, ["--tasks", str(args.tasks)]) for v, code in codes.items()}
    try:
        results = {v: [] for v in codes}
        for _ in range(3):
            for v, child in children.items():
                results[v].append(child.ask({"what": "list"}))
        for v, rs in results.items():
            for name in rs[0]:
                rows.append({"section": "list", "version": v, "store": f"{args.tasks} tasks, {name}",
                             "list_ms": med(r[name]["list_ms"] for r in rs),
                             "position_ms": med(r[name]["position_ms"] for r in rs)})
    finally:
        for child in children.values():
            child.close()


def run_poll(codes: dict, args, rows: list) -> None:
    params = ({"prompt": "a lake", "samples": 2, "steps": 10, "width": 128, "height": 128, "seed": "7",
               "selectedLoraModel": []} if args.quick else
              {"prompt": "a lake", "samples": 2, "steps": 20, "width": 256, "height": 256, "seed": "7",
               "selectedLoraModel": []})
    variants = [(v, code, {}) for v, code in codes.items()]
    variants.append(("B", None, {"EASEL_TORCH_THREADS": "2"}))
    servers = {}
    try:
        for v, code, env in variants:
            servers[(v, env.get("EASEL_TORCH_THREADS", "auto"))] = srv = Server(code, env=env)
            poll_pair(srv, params)  # warm-up: loads the pipeline
        results = {k: [] for k in servers}
        for _ in range(args.repeats):
            for key, srv in servers.items():
                results[key].append(poll_pair(srv, params))
        for (v, threads), rs in results.items():
            rows.append({"section": "poll", "version": v, "torch_threads": threads,
                         "idle_s": med(r[0] for r in rs), "polled_s": med(r[1] for r in rs),
                         "slowdown": med(r[1] / r[0] - 1 for r in rs)})
    finally:
        for srv in servers.values():
            srv.stop()


def table(rows: list, machine: str) -> str:
    """One markdown table of every row."""
    lines = [f"machine: {machine}", "", "| section | case | A (base) | B (this tree) | target |", "|---|---|---|---|---|"]
    by = {}
    for r in rows:
        key = (r["section"], r.get("case") or r.get("store") or
               (f"{r['endpoint']}, {r['processes']} API process{'es' if r['processes'] > 1 else ''}"
                if r["section"] == "api" else None) or
               (f"torch threads {r['torch_threads']}" if r["section"] == "poll" else "micro"))
        by.setdefault(key, {})[r["version"]] = r

    def fmt(section: str, r: dict | None) -> str:
        if r is None:
            return "—"
        if section == "worker":
            return (f"raw {r['raw_s']:.3f} s, raw+png {r['raw_png_s']:.3f} s (png {1000 * r['png_s']:.0f} ms), "
                    f"Easel {r['easel_s']:.3f} s: ×{r['ratio_png']:.3f} of raw+png, ×{r['ratio_raw']:.3f} of raw, "
                    f"fixed {r['fixed_ms']:.1f} ms; CPU ×{r['ratio_cpu']:.3f}, +{r['fixed_cpu_ms']:.1f} ms; "
                    f"Easel's own CPU in the task {r['own_cpu_ms']:.1f} ms, of which fixed (not per step) "
                    f"{r['own_fixed_cpu_ms']:.1f} ms; accept→start {r['to_start_ms']:.1f} ms, "
                    f"last step→end {r['after_last_step_ms']:.1f} ms; stored per task: events "
                    f"{r['events_kb']:.1f} KB of messages, previews {r['preview_kb']:.1f} KB")
        if section == "micro":
            return (f"progress write {r['progress_ms']:.3f} ms, lease renewal {r['lease_ms']:.3f} ms, 4×512² PNG {r['png4_ms']:.0f} ms, same LoRA again {r['lora_same_ms']:.2f} ms")
        if section == "api":
            return (f"{r['rps']:.0f}/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                    f"{r['cpu_ms']:.2f} CPU ms/request (rounds {r['runs']}, {r['errors']} non-2xx, {r['tool']})")
        if section == "list":
            return f"Task/List {r['list_ms']:.2f} ms, queued task's view {r['position_ms']:.2f} ms"
        if section == "poll":
            return f"denoise {r['idle_s']:.3f} s idle, {r['polled_s']:.3f} s polled: {100 * r['slowdown']:+.1f} %"
        return str(r)

    targets = {"worker": "≤ 1 % over raw+png at seed sizes; fixed ≤ 5 ms", "micro": "",
               "api": "Run ≥ 1000/s, p99 ≤ 50 ms; Detail ≥ 2000/s", "list": "≤ 5 ms",
               "poll": "not measurably slower"}
    for (section, case), versions in by.items():
        lines.append(f"| {section} | {case} | {fmt(section, versions.get('A'))} | {fmt(section, versions.get('B'))} "
                     f"| {targets[section]} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", choices=("worker", "list"), help=argparse.SUPPRESS)
    ap.add_argument("--base", type=Path, help="another version's source tree, measured interleaved as 'A'")
    ap.add_argument("--quick", action="store_true", help="small sizes (CI smoke run)")
    ap.add_argument("--only", default="worker,api,list,poll", help="sections to run (worker includes micro)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the API load")
    ap.add_argument("--seconds", type=float, default=8.0, help="seconds of load per round")
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    if args.child == "worker":
        return child_worker(args.quick)
    if args.child == "list":
        return child_list(args.tasks)
    codes = {"A": args.base.resolve(), "B": None} if args.base else {"B": None}
    rows: list = []
    machine = (f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the start "
               f"({time.strftime('%Y-%m-%d %H:%M')})")
    sections = {"worker": run_worker, "api": run_api, "list": run_list, "poll": run_poll}
    for name in args.only.split(","):
        began = time.time()
        sections[name.strip()](codes, args, rows)
        print(f"[{name}: {time.time() - began:.0f} s, load average now {os.getloadavg()[0]:.1f}]", file=sys.stderr)
        print(table([r for r in rows if r["section"] in (name.strip(), "micro")], machine), file=sys.stderr)
        if args.json:  # what is measured so far survives an interrupted run
            args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    machine += f"; {os.getloadavg()[0]:.1f} at the end"
    print(table(rows, machine))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
