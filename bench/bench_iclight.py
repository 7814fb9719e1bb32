"""Benchmark the IC-Light tool on the tiny models, warm.

Prints (a) a direct call of the same procedure (``easel.tools.ic_light.process``: matting, both
passes) in this process, (b) Easel's Run → task_postprocess_end through HTTP for the same inputs
(images uploaded first with ``POST /v1/File/Upload``, the seed's request naming them), their ratio
(target ≤ 1.05; the two are measured interleaved), and (c) the share of the direct call's time in matting, the low-res pass and the
high-res pass (decode, upscale, re-encode, conditioning, img2img, final decode).

Run: ``.venv/bin/python bench/bench_iclight.py [--repeats N] [--steps N]``. The inputs are the
demo's (``easel demo``): a 384×512 foreground and a 512×384 background, so the low-res pass runs at
384×512 and the output is 576×768; 30 steps, CFG 2.0, highres 1.5 / 0.5 (the seed's values).
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import serve  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()

    from PIL import Image

    from easel.catalog import load_tools
    from easel.pipelines.rmbg import load_rmbg
    from easel.weights.sources import Weights
    from easel.synthetic.tiny import make_tiny
    from easel.tools import ic_light

    example = load_tools()["wiro/ic-light-background"].example  # the seed's request and its input images
    files = example.read_files()
    fg = Image.open(io.BytesIO(files["ic-light.png"])).convert("RGB")
    bg = Image.open(io.BytesIO(files["bg-img2.png"])).convert("RGB")
    body = {**example.request, "steps": args.steps, "callbackUrl": ""}

    data = Path(tempfile.mkdtemp(prefix="easel-bench-"))
    tiny = make_tiny(data / "models" / "tiny")
    pipe = ic_light.load_iclight(Weights("diffusers", tiny["sd15"]), tiny["iclight-fbc"])
    rmbg = load_rmbg(tiny["rmbg"])

    def direct() -> tuple[float, dict[str, float]]:
        marks: dict[str, float] = {}
        t0 = time.perf_counter()

        def on_step(phase, _latents):
            marks[phase] = time.perf_counter()

        ic_light.process(pipe, rmbg, fg, bg, ic_light.UPLOAD, body["prompt"], body["negativePrompt"], 1, 123456,
                         args.steps, 2.0, 1.5, 0.5, on_step,
                         ic_light.lowres_size(*fg.size, ic_light.MIN_SIDE // 8, ic_light.MAX_SIDE // 8))  # as tiny mode
        end = time.perf_counter()
        m, lo = marks["Matting"], marks["Low-res pass"]
        return end - t0, {"matting": m - t0, "low-res": lo - m, "high-res": end - lo}

    with serve(data) as srv:
        for name, content in files.items():
            r = srv.client.post(f"{srv.base}/v1/File/Upload", files={"file": (name, content)}).json()
            assert r["result"], r
        direct()  # warm-up
        srv.run_to_done("wiro/ic-light-background", body, poll=0.1)  # warm-up: loads the models in the worker
        raw, runs = [], []
        for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits both alike
            raw.append(direct())
            runs.append(srv.run_to_done("wiro/ic-light-background", body, poll=0.1))
    raw_med = statistics.median(r[0] for r in raw)
    easel_med = statistics.median(r[1] for r in runs)
    print(f"inputs: fg 384x512, bg 512x384 -> low-res 384x512, output 576x768; 1 sample, {args.steps} steps + "
          f"high-res img2img; tiny SD 1.5 + tiny fbc offset + tiny RMBG, CPU, warm, median of {args.repeats}")
    print(f"(a) direct call of the procedure       : {raw_med:.3f} s")
    print(f"(b) Easel Run -> task_postprocess_end  : {easel_med:.3f} s (HTTP, polling Task/Detail every 100 ms)")
    print(f"    ratio (b)/(a)                      : {easel_med / raw_med:.3f}  (target <= 1.05)")
    total = statistics.median(r[0] for r in raw)
    for phase in ("matting", "low-res", "high-res"):
        t = statistics.median(r[1][phase] for r in raw)
        print(f"(c) {phase:<9} {t:7.3f} s  {100 * t / total:5.1f} %")


if __name__ == "__main__":
    main()
