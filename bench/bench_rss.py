"""A long-lived worker's memory over many mixed tasks on full-size weights (issue 24's follow-up).

Easel's workers take every malloc block from the heap (:mod:`easel.malloc`: no ``mmap`` per block,
so that a denoising step reuses what the previous one freed), give free heap beyond 1 GiB back
after each task and after each eviction. This measures whether that bound holds when the tasks
differ: one ``easel serve --workers 1 --model-source random`` on full-size random SD 1.5, and
``--tasks`` Runs of ``wiro/text-to-image-sd-lora`` cycling through image sizes (128² to 320², square
and not), sample counts, step counts, schedulers, LoRA sets and two checkpoints (so the cache
loads, evicts and reloads pipelines). After each task it reads the worker's ``RssAnon`` (anonymous
resident memory: what malloc holds; the weights' file pages are ``RssFile``) and its minor faults.

Reported: RssAnon after each task, its maximum, and the mean of the last third against the mean
of the second third (a steady state shows no growth between them).

    python bench/bench_rss.py [--tasks 30] [--threads 2] [--weights DIR] [--json out.json]

``--weights``: an ``sd15-full`` folder ``make_random`` wrote already (else one is written under
the server's data directory: 4.3 GB, about 30 s).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_fullsize import server_pid  # noqa: E402
from common import fullsize_sd15_data_dir, serve  # noqa: E402

TOOL = "wiro/text-to-image-sd-lora"
SIZES = [(256, 256), (128, 128), (320, 320), (256, 192), (192, 320), (160, 224)]
SCHEDULERS = ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "DDIMScheduler"]
LORAS = [[], ["61"], ["62", "68"], ["524"]]
MODELS = ["482", "482", "482", "1087"]  # mostly one checkpoint, now and then another: loads and evictions


def worker_pid(server: int) -> int:
    """The server's (only) local worker process: its child started by multiprocessing's spawn
    (not the resource tracker, the other such child)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == server and b"spawn_main" in cmd:
            return int(entry)
    raise RuntimeError("worker process not found")


def memory(pid: int) -> dict:
    """``RssAnon``/``RssFile`` in MiB and the minor page faults so far of process ``pid``."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    faults = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
    return {"rss_anon_mib": int(status["RssAnon"].split()[0]) / 1024,
            "rss_file_mib": int(status["RssFile"].split()[0]) / 1024, "minflt": faults}


def requests(n: int):
    """``n`` mixed Run bodies (a fixed cycle: the same sequence in every run of the bench)."""
    combos = zip(itertools.cycle(SIZES), itertools.cycle(SCHEDULERS), itertools.cycle(LORAS),
                 itertools.cycle(MODELS), itertools.cycle([1, 2, 1]), itertools.cycle([4, 2, 3, 5]))
    for i, ((w, h), sched, loras, model, samples, steps) in zip(range(n), combos):
        yield {"prompt": f"a red fish in a blue bowl, {i}", "negativePrompt": "", "selectedModel": model,
               "selectedLoraModel": loras, "samples": str(samples), "steps": str(steps), "width": str(w),
               "height": str(h), "scale": "7.5", "scheduler": sched, "clipSkip": str(i % 3), "seed": str(i)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2, help="the worker's torch threads")
    ap.add_argument("--weights", type=Path, help="an sd15-full folder make_random wrote")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    data, _ = fullsize_sd15_data_dir("easel-bench-rss-", args.weights)
    rows = []
    load0 = os.getloadavg()
    with serve(data, "--model-source", "random", "--workers", "1",
               env={"EASEL_TORCH_THREADS": str(args.threads)}) as server:
        worker = None
        for i, body in enumerate(requests(args.tasks)):
            t = time.perf_counter()
            _, _, task = server.run_to_done(TOOL, body, poll=0.2)
            worker = worker or worker_pid(server_pid(server.base))
            row = {"task": i, "seconds": time.perf_counter() - t, "size": f"{body['width']}x{body['height']}",
                   "samples": int(body["samples"]), "steps": int(body["steps"]), "model": body["selectedModel"],
                   "loras": body["selectedLoraModel"], **memory(worker)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    anon = [r["rss_anon_mib"] for r in rows]
    third = max(1, len(anon) // 3)
    summary = {"tasks": len(rows), "rss_anon_max_mib": max(anon), "rss_anon_last_mib": anon[-1],
               "rss_anon_mean_second_third_mib": statistics.mean(anon[third:2 * third] or anon),
               "rss_anon_mean_last_third_mib": statistics.mean(anon[-third:]),
               "load_before": load0, "load_after": os.getloadavg()}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, **summary}, indent=1))


if __name__ == "__main__":
    main()
