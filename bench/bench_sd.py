"""Benchmark the SD + LoRA tool on the tiny model, warm.

Prints (a) the raw diffusers pipeline call time, (b) Easel's Run → task_postprocess_end time through
HTTP for the same inputs, their ratio (target ≤ 1.05), and (c) submit latency and task_queue →
task_start time. Run: ``.venv/bin/python bench/bench_sd.py [--full] [--repeats N]``.
``--full`` uses the seed's sizes (512² × 4 samples × 30 steps); the default is 256² × 2 × 20.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="seed sizes: 512x512, 4 samples, 30 steps")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    size, samples, steps = (512, 4, 30) if args.full else (256, 2, 20)
    params = {"selectedLoraModel": [], "prompt": "a lake", "samples": samples, "steps": steps, "width": size,
              "height": size, "seed": "7", "clipSkip": 0, "scale": 7.5}

    import torch

    from easel.models.sources import Weights
    from easel.models.tiny import make_tiny
    from easel.tools.sd_lora import load_pipeline

    data = Path(tempfile.mkdtemp(prefix="easel-bench-"))
    tiny = make_tiny(data / "models" / "tiny")
    pipe = load_pipeline(Weights("diffusers", tiny["sd15"]))
    kwargs = dict(prompt="a lake", num_images_per_prompt=samples, num_inference_steps=steps, width=size, height=size,
                  guidance_scale=7.5)
    pipe(generator=[torch.Generator().manual_seed(7 + i) for i in range(samples)], **kwargs)  # warm-up
    raw = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        pipe(generator=[torch.Generator().manual_seed(7 + i) for i in range(samples)], **kwargs)
        raw.append(time.perf_counter() - t)
    del pipe

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "easel", "serve", "--port", str(port), "--data-dir", str(data)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
        headers = {"x-api-key": json.loads(out.stdout)["apikey"]}
        client = httpx.Client(headers=headers, timeout=60)

        def one() -> tuple[float, float, float]:
            t0 = time.time()
            answer = client.post(f"{base}/v1/Run/wiro/text-to-image-sd-lora", json=params).json()
            submit = time.time() - t0
            while True:
                task = client.post(f"{base}/v1/Task/Detail", json={"taskid": answer["taskid"]}).json()["tasklist"][0]
                if task["status"] in ("task_postprocess_end", "task_cancel"):
                    break
                time.sleep(0.02)
            assert task["pexit"] == "0", task["debugerror"]
            done = time.time() - t0
            # stage times from the store (sub-second precision is in the events; Detail rounds to seconds)
            return submit, done, float(task["starttime"]) - float(task["createtime"])

        one()  # warm-up: loads the pipeline in the worker
        runs = [one() for _ in range(args.repeats)]
    finally:
        proc.terminate()
        proc.wait(20)
    raw_med = statistics.median(raw)
    easel_med = statistics.median(r[1] for r in runs)
    print(f"inputs: {size}x{size}, {samples} samples, {steps} steps, tiny SD 1.5, CPU, warm, median of {args.repeats}")
    print(f"(a) raw StableDiffusionPipeline call : {raw_med:.3f} s")
    print(f"(b) Easel Run -> task_postprocess_end: {easel_med:.3f} s (HTTP, polling Task/Detail every 20 ms)")
    print(f"    ratio (b)/(a)                    : {easel_med / raw_med:.3f}  (target <= 1.05)")
    print(f"(c) submit latency (Run answered)    : {1000 * statistics.median(r[0] for r in runs):.1f} ms")
    print(f"    task_queue -> task_start         : <= {statistics.median(r[2] for r in runs):.0f} s (Detail times are whole seconds)")


if __name__ == "__main__":
    main()
