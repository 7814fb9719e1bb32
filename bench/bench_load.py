"""Load time and memory of a full-size checkpoint: Easel's load against raw diffusers and the floor.

On random weights at the published size (``easel.synthetic.fullsize``, what ``--model-source
random`` writes), three ways of getting the same files into memory, interleaved, each in a fresh
process (imports done before the clock starts, so only the load is timed):

- ``read``: reading the files' bytes from a warm page cache (64 MiB ``readinto`` into one reused
  buffer; nothing kept): the floor any loader of these files has;
- ``raw``: diffusers' ``from_pretrained`` (a diffusers folder) or ``from_single_file`` (one
  original-layout checkpoint), in the target dtype, as a plain script calls it;
- ``easel``: the call a worker makes (SD 1.5: ``ModelManager.base_pipeline`` around
  ``easel.tools.sd_lora.load_pipeline``, in ``ModelManager.precision("sd15")``; SDXL: the base
  load of ``easel.tools.instant_id.load_base`` without the InstantID adapter it then attaches),
  in a process set up as a worker sets itself up at start (``easel.malloc``: the allocator's settings,
  and the imports' objects frozen out of the cyclic collector's reach).

Each child reports wall and CPU seconds of the load, then the seconds it takes to touch one element
per 4 KiB page of every weight (a memory-mapped safetensors load returns before reading the
bytes; the first step would pay for them), and memory: peak RSS (``ru_maxrss``, which
includes the file pages a memory-mapped safetensors read touches) and peak anonymous RSS
(``RssAnon`` sampled every 10 ms: the process's own copies of the weights), both above what the
process held after its imports, against the bytes of the loaded weights in the target dtype.

Targets (issue 24): Easel's load ≤ 1.2 × ``read``, and peak anonymous memory ≤ one copy of the
weights in the target dtype (no random initialisation before the load, no float32 copy of a
float16 file).

    python bench/bench_load.py                                   # SD 1.5 folder, float32 (CPU)
    python bench/bench_load.py --format single                   # SD 1.5 single file
    python bench/bench_load.py --family sdxl --format single --file-dtype float16 --precision half
    python bench/bench_load.py --repeats 5 --json out.json

The random files are written once under ``--dir`` (SD 1.5: 4.3 GB float32 / 2.1 GB float16;
SDXL: 13.9 / 6.9 GB, and about as much memory while it is written), the single file converted
from the folder (``easel.synthetic.tiny.write_single_file`` / ``tiny_sdxl.write_sdxl_single_file``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MODES = ("read", "raw", "easel")
CHUNK = 64 << 20


# -- the files ------------------------------------------------------------------------------------


def prepare(root: Path, family: str, fmt: str, file_dtype: str, size: str = "full") -> tuple[Path, Path]:
    """The random ``family`` folder in ``file_dtype`` and, for ``single``, its single-file
    checkpoint; written on first use. Returns (the folder, the file to load: folder or file)."""
    import torch

    from easel.synthetic.fullsize import make_random

    folder = make_random(root / file_dtype, family, size, dtype=getattr(torch, file_dtype))
    if fmt == "folder":
        return folder, folder
    single = folder.parent / f"{family}-{size}-single-file.safetensors"
    if not single.exists():
        pipe = _raw(folder, folder, family, "folder", getattr(torch, file_dtype))
        part = single.with_suffix(".part")
        if family == "sd15":
            from easel.synthetic.tiny import write_single_file

            write_single_file(pipe, part)
        else:
            from easel.synthetic.tiny_sdxl import write_sdxl_single_file

            write_sdxl_single_file(pipe, part)
        part.rename(single)
    return folder, single


def weight_files(path: Path) -> list[Path]:
    """The files a load reads: the ``.safetensors`` of a folder (and its components), or the file."""
    return sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]


def _without_loras(files: list[Path]) -> list[Path]:
    return [f for f in files if not f.name.startswith("lora-")]


# -- the three loads (in a child process) -----------------------------------------------------------


def _read(files: list[Path]) -> int:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return total


def _pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionPipeline if family == "sd15" else StableDiffusionXLPipeline


def _raw(folder: Path, path: Path, family: str, fmt: str, dtype):
    from easel.weights import dtype_kwargs

    extra = dict(safety_checker=None, requires_safety_checker=False) if family == "sd15" else {}
    cls = _pipeline_class(family)
    if fmt == "folder":
        return cls.from_pretrained(str(path), use_safetensors=True, **dtype_kwargs(dtype), **extra)
    return cls.from_single_file(str(path), config=str(folder), **dtype_kwargs(dtype), **extra)


def _easel_loader(folder: Path, path: Path, family: str, fmt: str, cpu_precision: str):
    """The worker's objects, built before the clock starts; returns the load to time."""
    from easel.catalog import ModelCatalog
    from easel.config import Settings
    from easel.weights import ModelManager
    from easel.weights.sources import Weights

    data = Path(tempfile.mkdtemp(prefix="easel-bench-load-"))
    settings = Settings(data_dir=data, cpu_precision=cpu_precision)
    models = ModelManager(settings, ModelCatalog.load(settings.core.catalog_override))
    weights = Weights("diffusers" if fmt == "folder" else "single_file", path,
                      config=None if fmt == "folder" else folder, key=f"bench:{path.name}")
    from easel.malloc import freeze_startup_objects, tune_allocator

    tune_allocator()  # what a worker process does at start, after its imports (easel.executors.local)
    freeze_startup_objects()
    if family == "sd15":
        from easel.tools.sd_lora import load_pipeline

        return lambda: models.base_pipeline("sd15", weights, lambda: load_pipeline(weights, models.precision("sd15"))).obj

    def load_sdxl():  # instant_id.load_base up to the adapter (its own files; not part of this checkpoint)
        from easel.weights import dtype_kwargs
        from easel.weights.precision import cast, place

        where = models.precision("instantid")
        kwargs = dict(**dtype_kwargs(where.dtype), add_watermarker=False)
        cls = _pipeline_class("sdxl")
        if fmt == "folder":
            pipe = cls.from_pretrained(str(path), use_safetensors=True, **kwargs)
        else:
            pipe = cls.from_single_file(str(path), config=str(folder), **kwargs)
        pipe.set_progress_bar_config(disable=True)
        place(pipe, where.device)
        cast(pipe.vae, where.vae_dtype_for(pipe.vae))
        return pipe

    return lambda: models.base_pipeline("sdxl", weights, load_sdxl).obj


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _touch(pipe) -> None:
    """Read one element per 4 KiB page of every weight: a memory-mapped safetensors load returns
    before the bytes are read, and the first denoising step pays for them; this pays now."""
    import torch

    with torch.no_grad():
        for module in pipe.components.values():
            if hasattr(module, "parameters"):
                for t in list(module.parameters()) + list(module.buffers()):
                    if t.numel():
                        t.detach().reshape(-1)[:: max(1, 4096 // t.element_size())].sum()


def _weights_bytes(pipe) -> int:
    total = 0
    for module in pipe.components.values():
        if hasattr(module, "parameters"):
            total += sum(t.numel() * t.element_size() for t in module.parameters())
            total += sum(t.numel() * t.element_size() for t in module.buffers())
    return total


def child(mode: str, folder: Path, path: Path, family: str, fmt: str, precision: str) -> dict:
    """One timed load in this process; the measurements as a dict (printed as JSON by ``main``)."""
    import torch
    import transformers

    import easel.tools.instant_id  # noqa: F401  (the same imports on every side, before the clock:
    import easel.tools.sd_lora  # noqa: F401  a first load imports the pipeline's modules lazily)
    from easel.weights import ModelManager  # noqa: F401

    _pipeline_class(family)
    for name in ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer"):
        getattr(transformers, name)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    dtype = torch.float32 if precision == "float32" else getattr(torch, "float16")
    files = _without_loras(weight_files(path))
    if mode == "read":
        load = lambda: _read(files)  # noqa: E731
    elif mode == "raw":
        load = lambda: _raw(folder, path, family, fmt, dtype)  # noqa: E731
    else:
        load = _easel_loader(folder, path, family, fmt, precision)
    base_rss, base_anon = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _status_kib("RssAnon")
    peak = [base_anon]
    done = threading.Event()

    def sample():
        while not done.wait(0.01):
            peak[0] = max(peak[0], _status_kib("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    c0, t0 = time.process_time(), time.perf_counter()
    obj = load()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    t1 = time.perf_counter()
    if mode != "read":
        _touch(obj)
    touch = time.perf_counter() - t1
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _status_kib("RssAnon"))
    return {"mode": mode, "seconds": seconds, "cpu_seconds": cpu, "touch_seconds": touch,
            "file_bytes": sum(f.stat().st_size for f in files),
            "weights_bytes": obj if mode == "read" else _weights_bytes(obj),
            "peak_rss_bytes": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) * 1024,
            "peak_anon_bytes": (peak[0] - base_anon) * 1024}


# -- the driver -------------------------------------------------------------------------------------


def run_child(args, mode: str, folder: Path, path: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--folder", str(folder), "--path", str(path),
           "--family", args.family, "--format", args.format, "--precision", args.precision]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    ap.add_argument("--format", choices=("folder", "single"), default="folder")
    ap.add_argument("--file-dtype", choices=("float32", "float16"), default="float32",
                    help="dtype the random files are written in")
    ap.add_argument("--precision", choices=("float32", "half"), default="float32",
                    help="the worker's cpu_precision: float32 (Easel's CPU default) or half (float16 targets)")
    ap.add_argument("--size", choices=("full", "small"), default="full",
                    help="small: the same classes with narrow layers (a quick check of the code paths)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of read, raw, easel (interleaved)")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "easel-bench-load")
    ap.add_argument("--json", type=Path, help="write every measurement here")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.path, args.family, args.format, args.precision)))
        return
    t0 = time.time()
    folder, path = prepare(args.dir, args.family, args.format, args.file_dtype, args.size)
    print(f"files ready in {time.time() - t0:.0f} s: {path}", flush=True)
    rows = []
    for r in range(args.repeats):
        _read(_without_loras(weight_files(path)))  # warm the page cache (again: others may have evicted it)
        for mode in MODES:
            row = run_child(args, mode, folder, path)
            rows.append({"round": r, **row})
            print(f"round {r} {mode:5s} {row['seconds']:7.2f} s (+{row['touch_seconds']:5.2f} s touching every page)"
                  f"  cpu {row['cpu_seconds']:7.2f} s  "
                  f"peak anon {row['peak_anon_bytes'] / 1e9:6.2f} GB  peak rss {row['peak_rss_bytes'] / 1e9:6.2f} GB  "
                  f"weights {row['weights_bytes'] / 1e9:6.2f} GB", flush=True)
    med = {m: statistics.median(x["seconds"] for x in rows if x["mode"] == m) for m in MODES}
    touched = {m: statistics.median(x["seconds"] + x["touch_seconds"] for x in rows if x["mode"] == m) for m in MODES}
    anon = max(x["peak_anon_bytes"] for x in rows if x["mode"] == "easel")
    weights = next(x["weights_bytes"] for x in rows if x["mode"] == "easel")
    summary = {"family": args.family, "size": args.size, "format": args.format, "file_dtype": args.file_dtype,
               "precision": args.precision, "file_bytes": rows[0]["file_bytes"], "median_seconds": med,
               "easel_over_read": med["easel"] / med["read"], "easel_over_raw": med["easel"] / med["raw"],
               "median_seconds_with_touch": touched, "easel_with_touch_over_read": touched["easel"] / touched["read"],
               "easel_peak_anon_over_weights": anon / weights, "loadavg": os.getloadavg(), "cores": os.cpu_count()}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
