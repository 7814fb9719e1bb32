"""Cost of live latent previews in the denoising loop (tiny SD 1.5 and tiny FLUX.1, CPU, warm).

For each pipeline, times the same call with (a) a step callback that does nothing, (b) a preview
every 5 steps (Easel's default ``EASEL_PREVIEW_INTERVAL``) and (c) a preview at every step, and
the cost of one ``latent_to_jpeg``. Run: ``.venv/bin/python bench/bench_previews.py [--size 512]``.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import torch

    from easel.config import Settings
    from easel.weights.sources import Weights
    from easel.synthetic.tiny import make_tiny
    from easel.tools import flux_lora, sd_lora
    from easel.tools.previews import latent_to_jpeg

    data = Path(tempfile.mkdtemp(prefix="easel-bench-previews-"))
    tiny = make_tiny(data / "tiny")
    pipes = {
        "sd15": sd_lora.load_pipeline(Weights("diffusers", tiny["sd15"])),
        "flux": flux_lora.load_pipeline(Weights("diffusers", tiny["flux"]), Settings(data_dir=data)),
    }
    print(f"{args.size}x{args.size}, {args.steps} steps, 1 sample, median of {args.repeats}")
    for family, pipe in pipes.items():
        shots = []

        def callback(every):
            def on_step_end(p, step, _t, kw):
                if every and ((step + 1) % every == 0 or step + 1 == args.steps):
                    lat = kw["latents"][:1]
                    if family == "flux":
                        lat = p._unpack_latents(lat, args.size, args.size, p.vae_scale_factor)
                    t = time.perf_counter()
                    latent_to_jpeg(lat[0], family)
                    shots.append(time.perf_counter() - t)
                return kw
            return on_step_end

        def timed(every):
            runs = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                pipe("a lake", num_inference_steps=args.steps, width=args.size, height=args.size,
                     generator=torch.Generator().manual_seed(1), callback_on_step_end=callback(every))
                runs.append(time.perf_counter() - t)
            return statistics.median(runs)

        timed(0)  # warm-up
        base, every5, every1 = timed(0), timed(5), timed(1)
        print(f"{family}: no previews {base:.3f} s | every 5 steps {every5:.3f} s ({100 * (every5 / base - 1):+.1f} %)"
              f" | every step {every1:.3f} s ({100 * (every1 / base - 1):+.1f} %)"
              f" | one preview {1000 * statistics.median(shots):.2f} ms")


if __name__ == "__main__":
    main()
