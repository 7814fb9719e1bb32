"""Benchmark the FLUX.1 LoRA tool on the tiny FLUX.1, warm, on this machine.

Prints:
(a) the raw ``FluxPipeline`` call (same LoRA loaded, same inputs), (b) Easel's Run →
task_postprocess_end through HTTP, and their ratio (target ≤ 1.05);
(c) a LoRA switch in the resident pipeline (hot-swap into the adapter slot, as the worker does)
against (d) a cold load of the base pipeline from disk (target: switch ≤ 10 % of the load).

Run: ``.venv/bin/python bench/bench_flux.py [--size 256] [--samples 1] [--steps 20] [--repeats 3]``.
The defaults are the seed's steps (20) at 256²; ``--size 1024`` is the seed's size.
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

TOOL = "wiro/text-to-image-flux-lora-fast"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--client", choices=("poll", "wait"), default="poll",
                    help="poll Task/Detail every 20 ms, or one Run with Prefer: wait=60")
    args = ap.parse_args()

    import torch

    from easel.config import Settings
    from easel.weights.cache import LoraState
    from easel.weights.sources import Weights
    from easel.synthetic.tiny import make_tiny
    from easel.tools.flux_lora import load_pipeline

    prompt = "vintage matchbox artwork, a lion"
    params = {"prompt": prompt, "samples": args.samples, "steps": args.steps, "scale": 3.5, "seed": "7",
              "width": args.size, "height": args.size}
    data = Path(tempfile.mkdtemp(prefix="easel-bench-flux-"))
    tiny = make_tiny(data / "models" / "tiny")
    settings = Settings(data_dir=data)

    # (d) cold base load, (c) LoRA switch by hot-swap
    loads = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        pipe = load_pipeline(Weights("diffusers", tiny["flux"]), settings)
        loads.append(time.perf_counter() - t)
    state = LoraState(hotswap_rank=settings.weights.lora_hotswap_rank)
    state.apply(pipe, [("peft", str(tiny["flux-lora-peft"]), 1.0)])
    switches = []
    for i in range(2 * args.repeats):
        layout = ("xlabs", "kohya")[i % 2] if i % 3 else "peft"
        t = time.perf_counter()
        state.apply(pipe, [(f"{layout}-{i}", str(tiny[f"flux-lora-{layout}"]), 1.0)])
        switches.append(time.perf_counter() - t)
    assert state.hotswaps == len(switches), state.last_action

    # (a) raw call with the catalog default LoRA's layout (XLabs) resident
    state.apply(pipe, [("xlabs", str(tiny["flux-lora-xlabs"]), 1.0)])

    def raw_call():
        pipe(prompt, num_images_per_prompt=args.samples, num_inference_steps=args.steps, guidance_scale=3.5,
             width=args.size, height=args.size,
             generator=[torch.Generator().manual_seed(7 + i) for i in range(args.samples)])

    raw_call()
    raw = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        raw_call()
        raw.append(time.perf_counter() - t)

    with serve(data) as srv:
        srv.run_to_done(TOOL, params)  # warm-up: loads the pipeline and the LoRA in the worker
        runs = [srv.run_to_done(TOOL, params, mode=args.client) for _ in range(args.repeats)]
    raw_med, easel_med = statistics.median(raw), statistics.median(r[1] for r in runs)
    load_med, switch_med = statistics.median(loads), statistics.median(switches)
    print(f"inputs: {args.size}x{args.size}, {args.samples} sample(s), {args.steps} steps, tiny FLUX.1, CPU, "
          f"warm, median of {args.repeats}")
    print(f"(a) raw FluxPipeline call            : {raw_med:.3f} s")
    how = "polling Task/Detail every 20 ms" if args.client == "poll" else "one Run with Prefer: wait=60"
    print(f"(b) Easel Run -> task_postprocess_end: {easel_med:.3f} s (HTTP, {how})")
    print(f"    ratio (b)/(a)                    : {easel_med / raw_med:.3f}  (target <= 1.05)")
    print(f"(c) LoRA switch (hot-swap)           : {1000 * switch_med:.1f} ms (median of {len(switches)})")
    print(f"(d) cold base pipeline load          : {1000 * load_med:.1f} ms")
    print(f"    ratio (c)/(d)                    : {switch_med / load_med:.3f}  (target <= 0.10)")


if __name__ == "__main__":
    main()
