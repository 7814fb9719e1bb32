"""Time InstantID's preprocessing and Run-to-done against a direct pipeline call, on the tiny models.

Part 1 (pieces): the median of ``--repeats`` runs (after a warm-up) of face analysis (insightface
over the tiny antelopev2 ONNX pack, 640×640 detector input, detection + recognition), keypoint
drawing, and each condition extraction: canny (OpenCV), depth (tiny DPT through transformers),
openpose (controlnet_aux's OpenposeDetector: the real body network at 512 px with tiny expanded
weights, peaks, limb assembly, drawing), then one InstantID generation at ``--size`` with
IdentityNet alone and with IdentityNet + openpose + depth + canny
(``easel.pipelines.instantid.generate``). The tiny face detector is a fixed graph, so its
time shows the libraries' pre/post-processing and runtime overhead, not the real networks' cost.

Part 2 (unless ``--no-server``), for each case of ``--cases`` (no ControlNet; openpose + depth +
canny), against (a), the same work in this process: decode of the same PNG, the tool's resize,
face analysis, ``draw_kps``, the condition images, ``generate`` with IdentityNet at 0.8, and the
PNG written as the tool writes it:

1. (b) the tool module itself (``prepare`` + ``run``) in this process with a stub context (no HTTP,
   no store, no events): what the tool adds;
2. (b) Run-to-done of ``wiro/instant-id-controlnet-lora`` through a real ``easel serve`` (photo by
   URL from a loopback file server; the client waits with ``Prefer: wait=50``, then polls if the
   task is still running, or polls Task/Detail every 20 ms, ``--client``).

Both sides are warm. Each case is measured ``--repeats`` times **interleaved** (a, b, a, b, ...)
so that load from other processes hits both alike, with the same torch thread count on both sides
(``--threads``; default the local worker's automatic count, ``EASEL_TORCH_THREADS``); wall time and CPU time are printed (CPU: this
process for (a), the API and worker processes for the server), because on a shared, overloaded
machine wall time mostly measures the other processes. The load average (``os.getloadavg``) is
printed before and after.

Run: ``.venv/bin/python bench/bench_instantid.py [--size 256] [--steps 8] [--repeats 5]
[--tool-steps 20] [--client wait|poll] [--cases none,three] [--no-pieces] [--no-server]``.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import serve  # noqa: E402


TOOL = "wiro/instant-id-controlnet-lora"


def _median(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _load() -> str:
    return "load average " + " / ".join(f"{v:.2f}" for v in os.getloadavg()) + " (1 / 5 / 15 min)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tool-steps", type=int, default=20, help="steps for the Run-to-done comparison (seed default 20)")
    ap.add_argument("--client", choices=("wait", "poll"), default="wait")
    ap.add_argument("--no-server", action="store_true")
    ap.add_argument("--no-pieces", action="store_true", help="skip part 1 (the pieces), run Run-to-done only")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads here and in the server's worker (EASEL_TORCH_THREADS); 0: the worker's automatic count")
    ap.add_argument("--cases", default="none,three", help="Run-to-done cases: none (no ControlNet), three (all three)")
    args = ap.parse_args()

    import torch
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    from easel.pipelines.conditions import DepthEstimator, OpenposeEstimator, canny_condition
    from easel.pipelines.faces import FaceAnalyzer
    from easel.pipelines.instantid import InstantIDAdapter, build_pipeline, draw_kps, generate, load_controlnet
    from easel.synthetic.tiny import make_tiny
    from easel.synthetic.tiny_faces import draw_test_face

    from easel.config import Settings
    from easel.tasks.threads import torch_thread_count

    cores = len(os.sched_getaffinity(0))
    args.threads = args.threads or torch_thread_count(Settings().worker, True, torch.cuda.is_available(), cores) \
        or torch.get_num_threads()
    torch.set_num_threads(args.threads)  # the same count on both sides of every comparison
    print(f"before: {_load()}, {cores} CPUs, torch threads {args.threads} (here and in the worker)")
    data = Path(tempfile.mkdtemp(prefix="easel-bench-"))
    tiny = make_tiny(data / "models" / "tiny")
    photo = Image.new("RGB", (args.size, args.size), (128, 128, 128))
    s = args.size
    draw_test_face(photo, (int(s * 0.35), int(s * 0.3), int(s * 0.65), int(s * 0.68)), 0)
    analyzer = FaceAnalyzer(tiny["faces"])
    depth = DepthEstimator(tiny["depth-dpt"])
    pose = OpenposeEstimator(tiny["pose-openpose"])
    face = analyzer.largest_face(photo)
    base = StableDiffusionXLPipeline.from_pretrained(str(tiny["sdxl"]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base.to(device)
    base.set_progress_bar_config(disable=True)
    adapter = InstantIDAdapter.load(tiny["instantid-ip-adapter"])
    adapter.attach(base.unet)
    nets = {n: load_controlnet(tiny[f"sdxl-controlnet-{n}"]).to(device) for n in ("identitynet", "openpose", "depth", "canny")}
    images = [draw_kps(photo.size, face.kps), pose(photo), depth(photo), canny_condition(photo)]

    def gen(names: tuple[str, ...]):
        pipe = build_pipeline(base, nets[names[0]], [nets[n] for n in names[1:]])
        generate(pipe, adapter, face.embedding, images[:len(names)], [0.8] + [1.0] * (len(names) - 1), 0.8, "a portrait",
                 num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0), output_type="latent")

    if not args.no_pieces:
        rows = {
            "face analysis (detect + embed)": _median(lambda: analyzer.largest_face(photo), args.repeats),
            "draw_kps": _median(lambda: draw_kps(photo.size, face.kps), args.repeats),
            "canny": _median(lambda: canny_condition(photo), args.repeats),
            "depth (tiny DPT)": _median(lambda: depth(photo), args.repeats),
            "openpose (controlnet_aux OpenposeDetector, tiny body weights, 512 px)": _median(lambda: pose(photo), args.repeats),
        }
        rows[f"generate {s}² {args.steps} steps, IdentityNet only"] = _median(lambda: gen(("identitynet",)), args.repeats)
        rows[f"generate {s}² {args.steps} steps, IdentityNet + openpose + depth + canny"] = _median(
            lambda: gen(("identitynet", "openpose", "depth", "canny")), args.repeats)
        print(f"device: {device}, torch threads: {torch.get_num_threads()}")
        for name, seconds in rows.items():
            print(f"{name:70s} {seconds * 1000:9.1f} ms")
    if not args.no_server:
        run_to_done(args, data, photo, base, adapter, nets, analyzer, depth, pose)
    print(f"after: {_load()}")


def run_to_done(args, data: Path, photo, base, adapter, nets, analyzer, depth, pose) -> None:
    """Run-to-done of the tool against the same work done in process, interleaved (module docstring)."""
    import torch

    from easel.pipelines.conditions import canny_condition
    from easel.pipelines.instantid import build_pipeline, draw_kps, generate
    from easel.tools.base import write_pngs
    from easel.tools.instant_id import IDENTITYNET_SCALE, _resize

    www = data / "www"
    www.mkdir()
    photo.save(www / "portrait.png")
    out = data / "direct-out"
    out.mkdir()
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/portrait.png"
    conditions = {"458": "openpose", "455": "depth", "454": "canny"}

    def direct(controlnets: tuple[str, ...]):
        from PIL import Image

        image = _resize(Image.open(www / "portrait.png").convert("RGB"), tiny=True)
        face = analyzer.largest_face(image)
        images, names = [draw_kps(image.size, face.kps)], ["identitynet"]
        for mid in controlnets:
            cond = conditions[mid]
            names.append(cond)
            images.append(canny_condition(image) if cond == "canny" else depth(image) if cond == "depth"
                          else pose(image, face_box=face.bbox))
        pipe = build_pipeline(base, nets["identitynet"], [nets[n] for n in names[1:]])
        result = generate(pipe, adapter, face.embedding, images, [IDENTITYNET_SCALE] + [1.0] * len(controlnets), 0.8,
                          "a portrait", "blurry", num_inference_steps=args.tool_steps, guidance_scale=5.0,
                          generator=[torch.Generator().manual_seed(7)])
        write_pngs(result.images, out, 7, lambda seed: "a portrait", {"seed": 7})

    def easel(srv, params) -> float:
        """Run → task_postprocess_end as the client sees it; a ``wait`` answered before the end
        (a task longer than 50 s on a loaded machine) goes on polling."""
        if args.client == "poll":
            return srv.run_to_done(TOOL, params, mode="poll")[1]
        t0 = time.time()
        answer = srv.client.post(f"{srv.base}/v1/Run/{TOOL}", json=params, headers={"Prefer": "wait=50"},
                                 timeout=120).json()
        task = answer["tasklist"][0]
        if task["status"] not in ("task_postprocess_end", "task_cancel"):
            task = srv.wait(answer["taskid"], poll=0.02)
        assert task["pexit"] == "0", task
        return time.time() - t0

    all_cases = {"none": ("no ControlNet", ()), "three": ("openpose + depth + canny", ("458", "455", "454"))}
    cases = [all_cases[c] for c in args.cases.split(",")]

    def params_for(controlnets, photo_url):
        params = {"selectedModel": "79", "selectedLoraModel": "", "selectedControlnetModel": ",".join(controlnets),
                  "inputImageUrl": photo_url, "prompt": "a portrait", "negativePrompt": "blurry", "steps": args.tool_steps,
                  "scale": 5.0, "ip_adapter_scale": 0.8, "samples": 1, "seed": "7", "scheduler": "EulerDiscreteScheduler"}
        for mid in controlnets:
            params[{"458": "controlnet-openpose-sdxl-1.0", "455": "controlnet-depth-sdxl-1.0",
                    "454": "controlnet-canny-sdxl-1.0"}[mid]] = 1.0
        return params

    def timed(fn) -> tuple[float, float]:
        """(wall s, CPU s of this process) of ``fn()``."""
        t, c = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - t, time.process_time() - c

    # (1) the tool module in this process with a stub context (no HTTP, no store, no events):
    # what the tool itself adds to the direct call
    tool_rows = {}
    for name, controlnets in cases:
        run_tool = _tool_in_process(data, www / "portrait.png", params_for(controlnets, "portrait.png"))
        run_tool()  # warm-up: the tool's own model cache loads everything
        direct(controlnets)
        a, b = [], []
        for _ in range(args.repeats):
            a.append(timed(lambda: direct(controlnets)))
            b.append(timed(run_tool))
        tool_rows[name] = (a, b)
    _report(f"The tool module in process (stub context), {args.tool_steps} steps, 128×160, "
            f"{args.repeats} interleaved pairs: (a) direct, (b) prepare + run", tool_rows)

    # (2) through the server
    results = {}
    with serve(data, "--model-source", "tiny", "--fetch-allow", "127.0.0.1",
               env={"EASEL_TORCH_THREADS": str(args.threads)}) as srv:
        procs = _server_processes(data)
        for name, controlnets in cases:
            params = params_for(controlnets, url)
            direct(controlnets)  # warm-up: both sides load everything
            srv.run_to_done(TOOL, params, mode="poll")
            a, b = [], []
            for _ in range(args.repeats):  # interleaved
                a.append(timed(lambda: direct(controlnets)))
                c = _cpu(procs)
                wall = easel(srv, params)
                b.append((wall, _cpu(procs) - c))
            results[name] = (a, b)
    httpd.shutdown()
    _report(f"Run-to-done, {args.tool_steps} steps, 128×160 output, client {args.client}, {args.repeats} interleaved "
            "pairs: (a) direct, (b) Easel (CPU: API + worker processes)", results)


def _report(title: str, rows: dict) -> None:
    print(title)
    for name, (a, b) in rows.items():
        wa, ca = [x[0] for x in a], [x[1] for x in a]
        wb, cb = [x[0] for x in b], [x[1] for x in b]
        ratios = sorted(y / x for x, y in zip(wa, wb))
        print(f"  {name:26s} wall: (a) {statistics.median(wa):.3f} s (b) {statistics.median(wb):.3f} s, ratio of medians "
              f"{statistics.median(wb) / statistics.median(wa):.3f}, pair ratios {' '.join(f'{r:.2f}' for r in ratios)}")
        print(f"  {'':26s} CPU:  (a) {statistics.median(ca):.3f} s (b) {statistics.median(cb):.3f} s, ratio of medians "
              f"{statistics.median(cb) / statistics.median(ca):.3f}   (target <= 1.05)")


def _server_processes(data: Path) -> list:
    """The ``easel serve`` process on ``data`` and its descendants (API and worker processes)."""
    import psutil  # a dependency of accelerate

    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "serve" in cmd and str(data) in cmd:
            return [proc, *proc.children(recursive=True)]
    raise RuntimeError("the easel serve process was not found")


def _cpu(procs: list) -> float:
    """CPU seconds (user + system, all threads) used so far by ``procs``."""
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except Exception:  # a process that ended
            pass
    return total


def _tool_in_process(data: Path, photo_path: Path, inputs: dict):
    """``prepare`` + ``run`` of the tool module on a stub ``ToolContext`` (tiny models, no store)."""
    from PIL import Image

    from easel.catalog import ModelCatalog
    from easel.config import Settings
    from easel.weights import ModelManager
    from easel.tools import instant_id

    models = ModelManager(Settings(data_dir=data, model_source="tiny"), ModelCatalog.load())
    out = data / "tool-out"
    out.mkdir(exist_ok=True)

    class Ctx:
        extras_requested = False
        output_dir = out

        def __init__(self):
            self.models = models

        def started(self):
            pass

        def progress(self, step, total, preview=None, task="Generate"):
            pass

        def wants_preview(self, step, total):
            return False

        def log(self, line):
            pass

        def input_file(self, value):
            raise KeyError(value)

        def image(self, field, value):
            return Image.open(photo_path).convert("RGB")

        def extra_output(self, name, image):
            pass

    ctx = Ctx()
    # as the server's validation hands it over: the multiselect as a list of ids
    inputs = {**inputs, "selectedControlnetModel": [m for m in inputs["selectedControlnetModel"].split(",") if m]}
    from easel.tools import load_tool

    tool = load_tool(instant_id.TOOL.name)
    return lambda: tool.run(tool.prepare(dict(inputs), ctx), ctx)


if __name__ == "__main__":
    main()
