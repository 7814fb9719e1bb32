"""Benchmark the SD + LoRA tool on the tiny model, warm.

Prints (a) the raw diffusers pipeline call time, (b) Easel's Run → task_postprocess_end time through
HTTP for the same inputs, their ratio (target ≤ 1.05), and (c) submit latency and task_queue →
task_start time. Run: ``.venv/bin/python bench/bench_sd.py [--full] [--repeats N]``.
``--full`` uses the seed's sizes (512² × 4 samples × 30 steps); the default is 256² × 2 × 20.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import serve  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="seed sizes: 512x512, 4 samples, 30 steps")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--client", choices=("poll", "wait"), default="poll",
                    help="poll Task/Detail every 20 ms, or one Run with Prefer: wait=60")
    args = ap.parse_args()
    size, samples, steps = (512, 4, 30) if args.full else (256, 2, 20)
    params = {"selectedLoraModel": [], "prompt": "a lake", "samples": samples, "steps": steps, "width": size,
              "height": size, "seed": "7", "clipSkip": 0, "scale": 7.5}

    import torch

    from easel.weights.sources import Weights
    from easel.synthetic.tiny import make_tiny
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

    with serve(data) as srv:
        def one() -> tuple[float, float, float]:
            submit, done, task = srv.run_to_done("wiro/text-to-image-sd-lora", params, mode=args.client)
            # Detail's times are whole seconds (sub-second times are in the events table)
            return submit, done, float(task["starttime"]) - float(task["createtime"])

        one()  # warm-up: loads the pipeline in the worker
        runs = [one() for _ in range(args.repeats)]
    raw_med = statistics.median(raw)
    easel_med = statistics.median(r[1] for r in runs)
    print(f"inputs: {size}x{size}, {samples} samples, {steps} steps, tiny SD 1.5, CPU, warm, median of {args.repeats}")
    print(f"(a) raw StableDiffusionPipeline call : {raw_med:.3f} s")
    how = "polling Task/Detail every 20 ms" if args.client == "poll" else "one Run with Prefer: wait=60"
    print(f"(b) Easel Run -> task_postprocess_end: {easel_med:.3f} s (HTTP, {how})")
    print(f"    ratio (b)/(a)                    : {easel_med / raw_med:.3f}  (target <= 1.05)")
    print(f"(c) submit latency (Run answered)    : {1000 * statistics.median(r[0] for r in runs):.1f} ms")
    print(f"    task_queue -> task_start         : <= {statistics.median(r[2] for r in runs):.0f} s (Detail times are whole seconds)")


if __name__ == "__main__":
    main()
