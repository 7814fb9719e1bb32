"""The GPU benchmark: every measurement of issue 14 in one command and one table.

On a CUDA machine it runs the random-weight networks at their published sizes
(``easel.synthetic.fullsize``) at the seeds' sizes; without CUDA it runs the same code at reduced
sizes (``--size small``, small images, few steps) so that CI exercises the whole script.

Rows:

- per tool (SD 1.5 LoRA tool, FLUX LoRA tool): the raw diffusers call on the same weights, LoRA
  and inputs plus the same PNG encoding, against Easel's Run → ``task_postprocess_end`` through
  HTTP (``Prefer: wait``), interleaved (raw, Easel, raw, Easel, ...), as the median of the pairwise
  ratios; seconds per image, denoising it/s, peak device memory of the raw process, and MFU =
  (FLOPs per denoising step × steps / denoising seconds) / measured matrix-product peak, where
  the FLOPs per step are counted from the network's shapes by ``torch.utils.flop_counter`` on one
  forward pass (classifier-free guidance doubles the batch for SD) and written in the output;
- ``--compile``: the same with ``torch.compile`` (server: ``EASEL_TORCH_COMPILE=1``);
- LoRA hot-swap time against a cold base load (FLUX), and the count of recompilations of a
  compiled transformer over ten LoRA and scale changes (must be 0; dynamo's
  ``error_on_recompile`` is set);
- CUDA only: model CPU offload with the process capped to 24 GB of device memory
  (``torch.cuda.set_per_process_memory_fraction``): time and peak memory;
- queue throughput of two local workers against one (``--workers-compare``).

Run: ``.venv/bin/python bench/bench_gpu.py`` (CUDA: full sizes, seeds' sizes), or
``.venv/bin/python bench/bench_gpu.py --quick`` (CPU smoke run: small networks, 64², 2 steps).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import serve  # noqa: E402

SD_TOOL, FLUX_TOOL = "wiro/text-to-image-sd-lora", "wiro/text-to-image-flux-lora-fast"


def matmul_peak(device: str, dtype) -> float:
    """Measured FLOP/s of a large square matrix product on ``device`` in ``dtype`` (best of 5)."""
    import torch

    n = 8192 if device.startswith("cuda") else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_flops(pipe, family: str, width: int, height: int, batch: int) -> int:
    """FLOPs of one denoiser forward at this size and batch, counted from the shapes of its
    matrix products and convolutions (``torch.utils.flop_counter.FlopCounterMode``)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    dev, dt = pipe.device, (pipe.unet if family != "flux" else pipe.transformer).dtype
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if family == "flux":
            cfg = pipe.transformer.config
            seq = (height // 16) * (width // 16)
            pipe.transformer(hidden_states=torch.randn(batch, seq, cfg.in_channels, device=dev, dtype=dt),
                             encoder_hidden_states=torch.randn(batch, 512, cfg.joint_attention_dim, device=dev, dtype=dt),
                             pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, device=dev, dtype=dt),
                             timestep=torch.ones(batch, device=dev, dtype=dt), guidance=torch.ones(batch, device=dev, dtype=dt),
                             txt_ids=torch.zeros(512, 3, device=dev, dtype=dt),
                             img_ids=torch.zeros(seq, 3, device=dev, dtype=dt))
        else:
            cfg = pipe.unet.config
            pipe.unet(torch.randn(batch, 4, height // 8, width // 8, device=dev, dtype=dt), 10,
                      encoder_hidden_states=torch.randn(batch, 77, cfg.cross_attention_dim, device=dev, dtype=dt))
    return counter.get_total_flops()


class Raw:
    """The raw diffusers call of a tool, on the weights and LoRA the server uses, plus PNG encoding."""

    def __init__(self, tool: str, settings, params: dict):
        from easel.catalog import ModelCatalog, load_tools
        from easel.weights import ModelManager

        self.tool, self.params = tool, params
        self.family = "flux" if tool == FLUX_TOOL else "sd15"
        catalog = ModelCatalog.load(None)
        self.models = ModelManager(settings, catalog)
        inputs = load_tools()[tool].validate(params, catalog)
        if self.family == "flux":
            from easel.tools import flux_lora as mod

            self.pipe = mod.load_pipeline(self.models.sources.checkpoint(catalog.get(load_tools()[tool].base_model)),
                                          settings)
            if inputs["selectedLoraModel"]:  # the request's LoRA, as the tool applies it (none when unselected)
                lora = self.models.sources.lora(catalog.get(inputs["selectedLoraModel"]))
                self.models.adapters(self.pipe, hotswap=True).apply(self.pipe, [(lora.key, str(lora.path), 1.0)])
        else:
            from easel.tools import sd_lora as mod

            self.pipe = mod.load_pipeline(self.models.sources.checkpoint(catalog.get(inputs["selectedModel"])))
            loras = [self.models.sources.lora(catalog.get(m)) for m in inputs["selectedLoraModel"]]
            self.models.adapters(self.pipe).apply(self.pipe, [(w.key, str(w.path), 1.0) for w in loras])
        self.mod, self.inputs = mod, inputs
        self.steps_seconds: list[float] = []

    def __call__(self, out: Path) -> float:
        import torch

        from easel.tools.base import write_pngs

        i = self.inputs
        n, steps = int(i["samples"]), int(i["steps"])
        gens = [torch.Generator("cpu").manual_seed(7 + k) for k in range(n)]
        kw = dict(num_images_per_prompt=n, num_inference_steps=steps, guidance_scale=float(i["scale"]),
                  width=int(i["width"]), height=int(i["height"]), generator=gens)
        marks: list[float] = []
        kw["callback_on_step_end"] = lambda _p, _s, _t, ck: (marks.append(time.perf_counter()), ck)[1]
        t = time.perf_counter()
        if self.family == "sd15" and int(i.get("clipSkip", 0)) > 0:
            kw["prompt_embeds"] = self.mod.encode_prompt(self.pipe, [i["prompt"]], int(i["clipSkip"]))
            kw["negative_prompt_embeds"] = self.mod.encode_prompt(self.pipe, [i.get("negativePrompt", "")],
                                                                  int(i["clipSkip"]))
        else:
            kw["prompt"] = i["prompt"]
        start = time.perf_counter()
        images = self.pipe(**kw).images
        write_pngs(images, out, 7, lambda s: "", {})
        self.steps_seconds.append(marks[-1] - start)
        return time.perf_counter() - t


def bench_tool(tool: str, params: dict, data: Path, settings, args, device: str, peak: float) -> dict:
    import torch

    env = {"EASEL_MODEL_SOURCE": "random", "EASEL_RANDOM_MODEL_SIZE": args.size,
           "EASEL_TORCH_COMPILE": "1" if args.compile else "0"}
    raw = Raw(tool, settings, params)
    if args.compile:
        (raw.pipe.transformer if raw.family == "flux" else raw.pipe.unet).compile()
    out = Path(tempfile.mkdtemp(prefix="easel-bench-raw-"))
    raw(out)  # warm-up (and compile)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    ratios, raws, easels = [], [], []
    with serve(data, "--model-source", "random", env=env) as srv:
        srv.run_to_done(tool, params, mode="wait")  # warm-up: the worker loads the pipeline
        for _ in range(args.repeats):
            r = raw(out)
            _, e, _ = srv.run_to_done(tool, params, mode="wait")
            raws.append(r)
            easels.append(e)
            ratios.append(e / r)
    n, steps = int(raw.inputs["samples"]), int(raw.inputs["steps"])
    cfg_batch = n * (2 if raw.family == "sd15" and float(raw.inputs["scale"]) > 1 else 1)
    flops = step_flops(raw.pipe, raw.family, int(raw.inputs["width"]), int(raw.inputs["height"]), cfg_batch)
    denoise = statistics.median(raw.steps_seconds[1:] or raw.steps_seconds)
    row = {
        "tool": tool, "compiled": args.compile, "size": f"{raw.inputs['width']}x{raw.inputs['height']}",
        "samples": n, "steps": steps, "raw_s": statistics.median(raws), "easel_s": statistics.median(easels),
        "ratio": statistics.median(ratios), "s_per_image": statistics.median(raws) / n,
        "it_per_s": steps / denoise, "gflop_per_step": flops / 1e9,
        "mfu": flops * steps / denoise / peak,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
    }
    del raw
    return row


def bench_hotswap(settings, args) -> dict:
    """FLUX: hot-swap time vs cold base load; recompilations of a compiled transformer over ten
    LoRA and scale changes (dynamo ``error_on_recompile``: any recompile raises)."""
    import torch
    import torch._dynamo

    from easel.catalog import ModelCatalog, load_tools
    from easel.weights.cache import LoraState
    from easel.synthetic.fullsize import lora_paths
    from easel.weights.sources import ModelSources
    from easel.tools.flux_lora import load_pipeline

    catalog = ModelCatalog.load(None)
    sources = ModelSources(settings, catalog)
    weights = sources.checkpoint(catalog.get(load_tools()[FLUX_TOOL].base_model))
    loads = []
    for _ in range(2):
        t = time.perf_counter()
        pipe = load_pipeline(weights, settings)
        loads.append(time.perf_counter() - t)
    paths = lora_paths(weights.path, "flux")
    state = LoraState(hotswap_rank=settings.weights.lora_hotswap_rank)
    state.apply(pipe, [("peft", str(paths["peft"]), 1.0)])
    pipe.transformer.compile()
    small = dict(num_inference_steps=1, width=64 if args.size == "small" else 512,
                 height=64 if args.size == "small" else 512, guidance_scale=3.5)
    pipe("a lion", **small)
    switches, recompiles = [], 0
    torch._dynamo.config.error_on_recompile = True
    try:
        for i in range(10):
            layout = ("peft", "kohya")[i % 2]
            t = time.perf_counter()
            state.apply(pipe, [(f"{layout}-{i}", str(paths[layout]), 0.5 + 0.1 * i)])
            switches.append(time.perf_counter() - t)
            try:
                pipe("a lion", **small)
            except Exception as exc:  # dynamo raises on a recompile
                if "ecompil" not in str(exc):
                    raise
                recompiles += 1
    finally:
        torch._dynamo.config.error_on_recompile = False
    return {"hotswap_ms": 1000 * statistics.median(switches), "cold_load_s": min(loads),
            "hotswap_over_load": statistics.median(switches) / min(loads), "recompiles_over_10_changes": recompiles,
            "hotswaps": state.hotswaps}


def bench_offload(settings, cap_gib: float = 24.0) -> dict:
    """CUDA only: FLUX with model CPU offload in a process capped to ``cap_gib`` of device memory."""
    import torch
    from diffusers import FluxPipeline

    from easel.weights import dtype_kwargs
    from easel.weights.sources import ModelSources
    from easel.catalog import ModelCatalog, load_tools

    catalog = ModelCatalog.load(None)
    weights = ModelSources(settings, catalog).checkpoint(catalog.get(load_tools()[FLUX_TOOL].base_model))
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    pipe = FluxPipeline.from_pretrained(str(weights.path), **dtype_kwargs(torch.bfloat16))
    pipe.enable_model_cpu_offload()
    t = time.perf_counter()
    pipe("a lion", num_inference_steps=20, width=1024, height=1024, guidance_scale=3.5)
    seconds = time.perf_counter() - t
    torch.cuda.set_per_process_memory_fraction(1.0)
    return {"offload_cap_gib": cap_gib, "offload_s": seconds, "offload_peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def bench_workers(data: Path, args, params: dict, tasks: int) -> dict:
    """Throughput (tasks/s) of the SD tool with one and with two local workers on one device."""
    result = {}
    env = {"EASEL_MODEL_SOURCE": "random", "EASEL_RANDOM_MODEL_SIZE": args.size}
    for workers in (1, 2):
        with serve(data, "--model-source", "random", "--workers", str(workers), env=env) as srv:
            for _ in range(workers):
                srv.run_to_done(SD_TOOL, params, mode="wait")  # warm every worker (roughly)
            t = time.perf_counter()
            ids = [srv.client.post(f"{srv.base}/v1/Run/{SD_TOOL}", json=params).json()["taskid"] for _ in range(tasks)]
            for taskid in ids:
                srv.wait(taskid)
            result[f"tasks_per_s_{workers}w"] = tasks / (time.perf_counter() - t)
    return result


def main() -> None:
    import torch

    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=("full", "small"), default="full" if cuda else "small")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: small networks, 64², 2 steps, 1 repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also measure with torch.compile")
    ap.add_argument("--workers-compare", type=int, default=8, help="tasks for the 1 vs 2 workers run (0: skip)")
    ap.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = ap.parse_args()
    if args.quick:
        args.size, args.repeats, args.workers_compare = "small", 1, min(args.workers_compare, 2)
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    device = "cuda" if cuda else "cpu"
    big = args.size == "full" and not args.quick
    sd = {"prompt": "summer landscape, waterfall", "seed": "7", "samples": 4 if big else 1,
          "steps": 30 if big else 2, "width": 512 if big else 64, "height": 512 if big else 64, "clipSkip": 4}
    flux = {"prompt": "vintage matchbox artwork, a lion", "seed": "7", "samples": 1, "steps": 20 if big else 2,
            "width": 1024 if big else 64, "height": 1024 if big else 64}
    from easel.config import Settings

    data = Path(tempfile.mkdtemp(prefix="easel-bench-gpu-"))
    settings = Settings(data_dir=data, model_source="random", random_model_size=args.size)
    peak = matmul_peak(device, torch.bfloat16 if cuda else torch.float32)
    rows = []
    for compiled in ((False, True) if args.compile else (False,)):
        args.compile = compiled
        rows.append(bench_tool(SD_TOOL, sd, data, settings, args, device, peak))
        rows.append(bench_tool(FLUX_TOOL, flux, data, settings, args, device, peak))
    extra = bench_hotswap(settings, args)
    if cuda and args.size == "full":
        extra.update(bench_offload(settings))
    if args.workers_compare:
        extra.update(bench_workers(data, args, sd, args.workers_compare))
    name = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    print(f"device: {name}; networks: random weights, {args.size} size; matmul peak "
          f"{peak / 1e12:.2f} TFLOP/s ({'bf16' if cuda else 'fp32'}); median of {args.repeats}")
    head = ("tool", "compiled", "size", "samples", "steps", "raw_s", "easel_s", "ratio", "s_per_image", "it_per_s",
            "gflop_per_step", "mfu", "peak_mem_gib")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join(f"{r[h]:.4g}" if isinstance(r[h], float) else str(r[h]) for h in head))
    for k, v in extra.items():
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "size": args.size, "rows": rows, **extra}, indent=1))


if __name__ == "__main__":
    main()
