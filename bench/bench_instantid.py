"""Time InstantID's preprocessing and a direct pipeline call on the tiny models (CPU or GPU).

Prints the median of ``--repeats`` runs of: face analysis (insightface over the tiny antelopev2
ONNX pack, 640×640 detector input, detection + recognition), keypoint drawing, canny (OpenCV),
depth (tiny DPT through transformers), and one InstantID generation at ``--size`` with IdentityNet
plus canny and depth ControlNets (``easel.models.instantid.generate``), next to the same call
with IdentityNet alone. The tiny detector is a fixed ONNX graph, so the face-analysis time shows
insightface's pre/post-processing and ONNX Runtime overhead, not SCRFD-10GF's cost.

Then (unless ``--no-server``) Run-to-done: the tool ``wiro/instant-id-controlnet-lora`` through a
real ``easel serve`` (photo by URL from a loopback file server, polling Task/Detail every 20 ms),
against a direct in-process call doing the same work (resize as the tool does for tiny models,
face analysis, ``draw_kps``, ``generate`` with IdentityNet at 0.8, PNG writing is not included).

Run: ``.venv/bin/python bench/bench_instantid.py [--size 256] [--steps 8] [--repeats 3] [--no-server]``.
"""
from __future__ import annotations

import argparse
import http.server
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import serve  # noqa: E402


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
    ap.add_argument("--tool-steps", type=int, default=20, help="steps for the Run-to-done comparison (seed default 20)")
    ap.add_argument("--no-server", action="store_true")
    args = ap.parse_args()

    import torch
    from diffusers import ControlNetModel, StableDiffusionXLPipeline
    from PIL import Image

    from easel.models.conditions import DepthEstimator, canny_condition
    from easel.models.faces import FaceAnalyzer
    from easel.models.instantid import InstantIDAdapter, build_pipeline, draw_kps, generate
    from easel.models.tiny import make_tiny
    from easel.models.tiny_faces import draw_test_face

    data = Path(tempfile.mkdtemp(prefix="easel-bench-"))
    tiny = make_tiny(data / "models" / "tiny")
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
    if not args.no_server:
        run_to_done(args, data, photo, base, adapter, nets[0], analyzer)


def run_to_done(args, data: Path, photo, base, adapter, identitynet, analyzer) -> None:
    """Run-to-done of the tool against the same work done in process (see the module docstring)."""
    import torch

    from easel.models.instantid import build_pipeline, draw_kps, generate
    from easel.tools.instant_id import IDENTITYNET_SCALE, _resize

    www = data / "www"
    www.mkdir()
    photo.save(www / "portrait.png")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(www), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/portrait.png"

    def direct():
        from PIL import Image

        image = _resize(Image.open(www / "portrait.png").convert("RGB"), tiny=True)
        face = analyzer.largest_face(image)
        pipe = build_pipeline(base, identitynet)
        generate(pipe, adapter, face.embedding, [draw_kps(image.size, face.kps)], [IDENTITYNET_SCALE], 0.8, "a portrait",
                 "blurry", num_inference_steps=args.tool_steps, guidance_scale=5.0,
                 generator=[torch.Generator().manual_seed(7)])

    raw = _median(direct, args.repeats)
    params = {"selectedModel": "79", "selectedLoraModel": "", "selectedControlnetModel": "", "inputImageUrl": url,
              "prompt": "a portrait", "negativePrompt": "blurry", "steps": args.tool_steps, "scale": 5.0,
              "ip_adapter_scale": 0.8, "samples": 1, "seed": "7", "scheduler": "EulerDiscreteScheduler"}
    with serve(data, "--model-source", "tiny", "--fetch-allow", "127.0.0.1") as srv:
        srv.run_to_done("wiro/instant-id-controlnet-lora", params, mode="poll")  # warm-up: loads everything
        runs = [srv.run_to_done("wiro/instant-id-controlnet-lora", params, mode="poll")[1] for _ in range(args.repeats)]
    httpd.shutdown()
    easel = statistics.median(runs)
    print(f"(a) direct: resize + face analysis + draw_kps + generate, {args.tool_steps} steps : {raw:.3f} s")
    print(f"(b) Easel Run -> task_postprocess_end (photo by URL, polling 20 ms)      : {easel:.3f} s")
    print(f"    ratio (b)/(a): {easel / raw:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
