"""Time InstantID's preprocessing and a direct pipeline call on the tiny models (CPU or GPU).

Prints the median of ``--repeats`` runs of: face analysis (insightface over the tiny antelopev2
ONNX pack, 640×640 detector input, detection + recognition), keypoint drawing, canny (OpenCV),
depth (tiny DPT through transformers), and one InstantID generation at ``--size`` with IdentityNet
plus canny and depth ControlNets (``easel.models.instantid.generate``), next to the same call
with IdentityNet alone. The tiny detector is a fixed ONNX graph, so the face-analysis time shows
insightface's pre/post-processing and ONNX Runtime overhead, not SCRFD-10GF's cost.

Run: ``.venv/bin/python bench/bench_instantid.py [--size 256] [--steps 8] [--repeats 3]``.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def _median(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    from diffusers import ControlNetModel, StableDiffusionXLPipeline
    from PIL import Image

    from easel.models.conditions import DepthEstimator, canny_condition
    from easel.models.faces import FaceAnalyzer
    from easel.models.instantid import InstantIDAdapter, build_pipeline, draw_kps, generate
    from easel.models.tiny import make_tiny
    from easel.models.tiny_faces import draw_test_face

    tiny = make_tiny(Path(tempfile.mkdtemp(prefix="easel-bench-")) / "tiny")
    photo = Image.new("RGB", (args.size, args.size), (128, 128, 128))
    s = args.size
    draw_test_face(photo, (int(s * 0.35), int(s * 0.3), int(s * 0.65), int(s * 0.68)), 0)
    analyzer = FaceAnalyzer(tiny["faces"])
    depth = DepthEstimator(tiny["depth-dpt"])
    face = analyzer.largest_face(photo)
    rows = {
        "face analysis (detect + embed)": _median(lambda: analyzer.largest_face(photo), args.repeats),
        "draw_kps": _median(lambda: draw_kps(photo.size, face.kps), args.repeats),
        "canny": _median(lambda: canny_condition(photo), args.repeats),
        "depth (tiny DPT)": _median(lambda: depth(photo), args.repeats),
    }
    base = StableDiffusionXLPipeline.from_pretrained(str(tiny["sdxl"]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base.to(device)
    adapter = InstantIDAdapter.load(tiny["instantid-ip-adapter"])
    adapter.attach(base.unet)
    nets = [ControlNetModel.from_pretrained(str(tiny[f"sdxl-controlnet-{n}"])).to(device)
            for n in ("identitynet", "canny", "depth")]
    images = [draw_kps(photo.size, face.kps), canny_condition(photo), depth(photo)]

    def gen(n: int):
        pipe = build_pipeline(base, nets[0], nets[1:n])
        generate(pipe, adapter, face.embedding, images[:n], [0.8] + [1.0] * (n - 1), 0.8, "a portrait",
                 num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0), output_type="latent")

    rows[f"generate {s}² {args.steps} steps, IdentityNet only"] = _median(lambda: gen(1), args.repeats)
    rows[f"generate {s}² {args.steps} steps, IdentityNet + canny + depth"] = _median(lambda: gen(3), args.repeats)
    print(f"device: {device}, torch threads: {torch.get_num_threads()}")
    for name, seconds in rows.items():
        print(f"{name:55s} {seconds * 1000:9.1f} ms")


if __name__ == "__main__":
    main()
