"""Easel's overhead on full-size weights: one image through Easel's HTTP API against the same
diffusers call in a plain script, interleaved (issue 24).

Random SD 1.5 at the published size (``--model-source random``, ``easel.synthetic.fullsize``),
256², 10 steps, Euler, guidance 7.5, one sample, ``--threads`` torch threads on both sides:

- **easel**: ``easel serve --model-source random --workers 1`` (``EASEL_TORCH_THREADS``); a client
  posts ``/v1/Run/wiro/text-to-image-sd-lora`` and follows the task on Wiro's WebSocket until
  ``task_postprocess_end`` (wall: Run → that frame); CPU: every process of the server (API,
  worker) over that time, from ``/proc``, and the API process's share alone;
- **raw**: one Python process holding ``StableDiffusionPipeline.from_pretrained`` of the same
  folder, Euler scheduler, calling ``pipe(prompt, negative_prompt=None, num_inference_steps=10,
  guidance_scale=7.5, width=256, height=256, generator=...)``; wall and CPU (``process_time``,
  all threads) of the call.

Both warm first (one untimed image each: the loads), then ``--pairs`` pairs, alternating which
side goes first (raw-easel, easel-raw, ...) so that a drift in the machine's load falls on both;
per pair the ratios easel / raw of wall and of CPU seconds; reported: their medians, and the
load average before and after. Target: ≤ 1.01.

    python bench/bench_fullsize.py [--pairs 5] [--threads 2] [--weights DIR] [--json out.json] [--raw-tuned-malloc]

Each side's system CPU seconds and minor page faults are reported too: Easel's workers tune glibc's
malloc (:mod:`easel.malloc`: no ``mmap`` per block) so that a step reuses the memory the previous
one freed; the plain script keeps glibc's defaults, and maps (and the kernel zero-fills) the
blocks above its mmap threshold again at each use, between none and 5 million page faults per
image depending on the process's history. ``--raw-tuned-malloc`` gives the raw side the same
settings, which leaves Easel's own overhead (the API, the worker's bookkeeping) on an equal
allocator.

``--weights``: an ``sd15-full`` folder ``make_random`` wrote already (else one is written under
the server's data directory: 4.3 GB, about 30 s).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_server import tree_cpu  # noqa: E402
from common import fullsize_sd15_data_dir, serve  # noqa: E402

TOOL = "wiro/text-to-image-sd-lora"
PROMPT = "a red fish in a blue bowl"
PARAMS = {"selectedLoraModel": [], "samples": "1", "steps": "10", "width": "256", "height": "256", "scale": "7.5",
          "scheduler": "EulerDiscreteScheduler", "clipSkip": "0", "prompt": PROMPT, "negativePrompt": ""}


# -- the raw side (a child process) ---------------------------------------------------------------


def raw_child(folder: Path, threads: int, tuned_malloc: bool = False) -> None:
    """Load the pipeline, then answer each line on stdin (a seed) with the call's wall and CPU
    (``tuned_malloc``: with the malloc settings of Easel's workers, :mod:`easel.malloc`)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    torch.set_num_threads(threads)
    if tuned_malloc:
        from easel.malloc import tune_allocator

        assert tune_allocator()
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), use_safetensors=True, torch_dtype=torch.float32,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        seed = int(line)
        t, cpu, before = time.perf_counter(), time.process_time(), kernel_side(os.getpid())
        pipe(PROMPT, negative_prompt=None, num_images_per_prompt=1, num_inference_steps=10, guidance_scale=7.5,
             width=256, height=256, generator=[torch.Generator("cpu").manual_seed(seed)])
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        after = kernel_side(os.getpid())
        print(json.dumps({"wall": wall, "cpu": cpu, **{k: after[k] - before[k] for k in after}}), flush=True)


class Raw:
    def __init__(self, folder: Path, threads: int, tuned_malloc: bool = False):
        cmd = [sys.executable, __file__, "--raw-child", str(folder), "--threads", str(threads)]
        self.proc = subprocess.Popen(cmd + (["--raw-tuned-malloc"] if tuned_malloc else []), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert json.loads(self.proc.stdout.readline())["ready"]

    def image(self, seed: int) -> dict:
        self.proc.stdin.write(f"{seed}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


# -- the Easel side ---------------------------------------------------------------------------------


def easel_image(server, pid: int, seed: int) -> dict:
    """One Run followed on the WebSocket to ``task_postprocess_end``: wall and the server's CPU."""
    from websockets.sync.client import connect

    cpu, api, t, before = tree_cpu(pid), own_cpu(pid), time.perf_counter(), kernel_side(pid, tree=True)
    answer = server.client.post(f"{server.base}/v1/Run/{TOOL}", json={**PARAMS, "seed": str(seed)}).json()
    assert answer.get("result"), answer
    with connect(server.base.replace("http", "ws") + "/v1", open_timeout=30) as ws:
        ws.send(json.dumps({"type": "task_info", "tasktoken": answer["socketaccesstoken"]}))
        while True:
            frame = json.loads(ws.recv(timeout=3600))
            if frame["type"] in ("task_postprocess_end", "task_cancel"):
                break
    wall = time.perf_counter() - t
    used, api = tree_cpu(pid) - cpu, own_cpu(pid) - api
    after = kernel_side(pid, tree=True)
    task = server.client.post(f"{server.base}/v1/Task/Detail", json={"taskid": answer["taskid"]}).json()["tasklist"][0]
    assert task["pexit"] == "0", task["debugerror"]
    return {"wall": wall, "cpu": used, "api_cpu": api, **{k: after[k] - before[k] for k in after}}


def own_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` alone: the API process, without its workers."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kernel_side(pid: int, tree: bool = False) -> dict:
    """System CPU seconds and minor page faults so far of process ``pid`` (and, with ``tree``,
    its children): where an allocator that maps its memory again at every step shows."""
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    if tree:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
        pids += [int(p) for p in out.split()]
    total = {"sys": 0.0, "minflt": 0}
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total["sys"] += int(fields[12]) / tick
        total["minflt"] += int(fields[7])
    return total


def server_pid(port_base: str) -> int:
    """The pid of the ``easel serve`` listening at ``port_base`` (``common.serve`` keeps it private)."""
    port = port_base.rsplit(":", 1)[1]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"serve" in cmd and port.encode() in cmd:
                return int(entry)
    raise RuntimeError("server process not found")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    ap.add_argument("--weights", type=Path, help="an sd15-full folder make_random wrote")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--raw-tuned-malloc", action="store_true",
                    help="give the raw side the malloc settings of Easel's workers (easel.malloc): Easel's own "
                         "overhead on an equal allocator")
    ap.add_argument("--raw-child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.raw_child:
        raw_child(args.raw_child, args.threads, args.raw_tuned_malloc)
        return
    data, folder = fullsize_sd15_data_dir("easel-bench-fullsize-", args.weights)
    load0 = os.getloadavg()
    rows = []
    with serve(data, "--model-source", "random", "--workers", "1",
               env={"EASEL_TORCH_THREADS": str(args.threads)}) as server:
        pid = server_pid(server.base)
        t = time.perf_counter()
        easel_image(server, pid, 1)  # warm: the worker loads the pipeline
        print(f"easel warm in {time.perf_counter() - t:.0f} s", flush=True)
        raw = Raw(folder, args.threads, args.raw_tuned_malloc)
        try:
            raw.image(1)  # warm
            for i in range(args.pairs):
                seed = 100 + i
                order = ("raw", "easel") if i % 2 == 0 else ("easel", "raw")
                got = {side: raw.image(seed) if side == "raw" else easel_image(server, pid, seed) for side in order}
                row = {"pair": i, "order": order, "loadavg": os.getloadavg()[0], **{f"{s}_{k}": v for s in got
                                                                                    for k, v in got[s].items()}}
                row["wall_ratio"] = row["easel_wall"] / row["raw_wall"]
                row["cpu_ratio"] = row["easel_cpu"] / row["raw_cpu"]
                rows.append(row)
                print(f"pair {i} ({order[0]} first): easel {row['easel_wall']:6.1f} s wall {row['easel_cpu']:6.1f} "
                      f"cpu-s | raw {row['raw_wall']:6.1f} s wall {row['raw_cpu']:6.1f} cpu-s | ratio wall "
                      f"{row['wall_ratio']:.3f} cpu {row['cpu_ratio']:.3f} | load {row['loadavg']:.1f} | sys-s / "
                      f"minor faults easel {row['easel_sys']:.1f} / {row['easel_minflt']} raw {row['raw_sys']:.1f} / "
                      f"{row['raw_minflt']} | API process {row['easel_api_cpu']:.2f} cpu-s", flush=True)
                if args.json:  # partial results survive an interrupted run
                    args.json.write_text(json.dumps({"rows": rows}, indent=1))
        finally:
            raw.close()
    summary = {"pairs": len(rows), "threads": args.threads, "cores": os.cpu_count(),
               "raw_tuned_malloc": args.raw_tuned_malloc,
               "median_wall_ratio": statistics.median(r["wall_ratio"] for r in rows),
               "median_cpu_ratio": statistics.median(r["cpu_ratio"] for r in rows),
               "median_easel_wall": statistics.median(r["easel_wall"] for r in rows),
               "median_raw_wall": statistics.median(r["raw_wall"] for r in rows),
               "median_easel_cpu": statistics.median(r["easel_cpu"] for r in rows),
               "median_raw_cpu": statistics.median(r["raw_cpu"] for r in rows),
               "median_easel_api_cpu": statistics.median(r["easel_api_cpu"] for r in rows),
               "loadavg_before": load0, "loadavg_after": os.getloadavg()}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
