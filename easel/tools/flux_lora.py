"""``wiro/text-to-image-flux-lora-fast``: FLUX.1-dev text-to-image with one LoRA.

Inputs (schema: ``easel/catalog/tools/wiro__text-to-image-flux-lora-fast.json``) map to diffusers'
``FluxPipeline`` as follows:

===============================  ============================================================
Wiro field                       diffusers
===============================  ============================================================
``selectedLoraModel``            one catalog Flux LoRA, at its ``generatesettings`` scale (the
                                 request may send that setting's id, e.g. ``flux-RealismLora``)
``selectedLoraModelPrivateUrl``  a user's ``.safetensors`` LoRA (safe fetcher), scale 1.0; when
                                 given it **takes the place of** ``selectedLoraModel``
``prompt``                       ``prompt`` (CLIP pooled + T5 context)
``steps``                        ``num_inference_steps``
``scale``                        ``guidance_scale``: FLUX.1-dev's *distilled* guidance, fed to
                                 the transformer's guidance embedding (no negative pass)
``samples``                      ``num_images_per_prompt`` (image *i* uses seed ``seed + i``)
``seed``                         ``torch.Generator`` seeds; empty / ``-1`` / non-numeric → random
``width`` / ``height``           ``width`` / ``height``: multiples of 16 (the VAE's factor 8 times
                                 the 2×2 latent packing); other values are **rejected** at
                                 submission with a message naming the field, never rounded
===============================  ============================================================

"fast" and "bf16", as the seed's tags promise: on CUDA the pipeline runs in bfloat16
(``easel.weights.precision``, kind ``flux``), stays resident between tasks
(``Settings.pipeline_cache_bytes``), and LoRAs change by **hot-swapping** into one adapter slot of
the resident transformer (``easel.weights.cache.LoraState``), so a ``torch.compile``-d transformer
(``Settings.torch_compile``) is not recompiled when the LoRA changes. ``Settings.cpu_offload``
enables diffusers' model CPU offload for small GPUs. On the CPU the same code runs in float32, or
in bfloat16 with ``Settings.cpu_precision = "half"``.

Flux LoRAs are accepted in the diffusers/PEFT, Kohya, XLabs and BFL key layouts (converted by
diffusers' ``FluxLoraLoaderMixin``); Easel reads the file's keys first and refuses a LoRA for
another family, or of an unknown layout, with a message naming what it found
(``easel.weights.lora_formats``).

Outputs: ``0.png`` … with the parameters in the PNG ``parameters`` text chunk and as JSON in ``easel``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from easel.catalog import load_tools
from easel.weights import ModelError, Precision, dtype_kwargs
from easel.net.fetch import FetchError
from easel.weights.lora_formats import LoraFormatError, require_family
from easel.weights.precision import cast, generators, place, precision

from .base import ToolContext, ToolError, write_pngs
from .previews import latent_to_jpeg
from .sd_lora import parse_seed

TOOL = "wiro/text-to-image-flux-lora-fast"


@dataclass
class FluxLora:
    """One LoRA to apply: ``key`` identifies the weights, ``scale`` is the adapter weight."""

    key: str
    path: str
    scale: float
    label: str
    layout: str = ""


@dataclass
class Plan:
    """Everything :func:`run` needs, resolved in the preprocess stage."""

    tool: str
    base: Any  # easel.weights.Weights
    base_label: str
    lora: FluxLora | None
    prompt: str
    samples: int
    steps: int
    guidance_scale: float
    seed: int
    width: int
    height: int


def checked_lora(key: str, path: Path | str, scale: float, label: str, field: str) -> FluxLora:
    """Build a :class:`FluxLora` after checking that the file is a FLUX.1 LoRA.

    Raises:
        ToolError: the file was made for another family, or its layout is unknown.
    """
    try:
        layout = require_family(path, "flux", field)
    except (LoraFormatError, FetchError) as exc:
        raise ToolError(str(exc)) from None
    return FluxLora(key, str(path), scale, label, layout.layout)


def make_plan(tool: str, inputs: dict[str, Any], lora: FluxLora | None, ctx: ToolContext) -> Plan:
    """The common part of both FLUX tools' ``prepare``: the base model, seed and numbers.

    Raises:
        ToolError: the base model's weights cannot be resolved.
    """
    spec = load_tools()[tool]
    try:
        base = ctx.models.checkpoint(spec.base_model or "", f"base model of {tool}", ("flux",))
    except ModelError as exc:
        raise ToolError(str(exc)) from None
    seed = parse_seed(inputs.get("seed", ""))
    ctx.log(f"seed={seed}")
    if lora is not None:
        ctx.log(f"LoRA {lora.label} ({lora.layout} layout) at scale {lora.scale:g}")
    return Plan(
        tool=tool, base=base.weights, base_label=base.label, lora=lora, prompt=inputs.get("prompt", ""),
        samples=int(inputs["samples"]), steps=int(inputs["steps"]), guidance_scale=float(inputs["scale"]),
        seed=seed, width=int(inputs["width"]), height=int(inputs["height"]),
    )


def prepare(inputs: dict[str, Any], ctx: ToolContext) -> Plan:
    """Resolve the base model and the LoRA (catalog id, or the private URL which replaces it).

    Raises:
        ToolError: a non-Flux LoRA, an unknown layout, an unset catalog source, or a refused URL.
    """
    models = ctx.models
    try:
        private = models.private_lora(inputs.get("selectedLoraModelPrivateUrl", ""), "selectedLoraModelPrivateUrl",
                                      "flux", ctx.input_file)
        if private is not None:
            lora = FluxLora(private.key, private.path, private.scale, private.label, private.layout)
        elif inputs.get("selectedLoraModel"):
            c = models.lora(inputs["selectedLoraModel"], "selectedLoraModel", "flux-lora", inputs)
            lora = checked_lora(c.key, c.path, c.scale, c.label, "selectedLoraModel")
        else:
            lora = None
    except (ModelError, FetchError, LoraFormatError) as exc:
        raise ToolError(str(exc)) from None
    return make_plan(TOOL, inputs, lora, ctx)


def weights_bytes(folder: Path) -> int:
    """Bytes of the ``.safetensors`` files under a diffusers folder (what the GPU must hold)."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*.safetensors"))


def needs_offload(model_bytes: int, gpu_total_bytes: int, forced: bool, headroom: float = 1.25) -> bool:
    """Whether to use model CPU offload: when forced, or when the GPU's memory is smaller than the
    weights plus ``headroom`` (activations, VAE decode at 1024², CUDA context; 25 % by default).

    FLUX.1-dev in bf16 is ~33 GB on disk (transformer 23.8 GB, T5-XXL 9.5 GB), so a 24 GB card
    offloads and an 80 GB card does not.
    """
    return forced or gpu_total_bytes < model_bytes * headroom


def load_pipeline(weights, options, where: Precision | None = None) -> Any:
    """Load a ``FluxPipeline`` from a local diffusers folder, in ``where``'s dtypes on its device
    (default ``precision("flux")``: bfloat16 on CUDA, float32 on the CPU).

    On CUDA, ``enable_model_cpu_offload`` when :func:`needs_offload` says so (``options.cpu_offload``,
    an :class:`easel.weights.RuntimeOptions`, forces it).
    """
    import torch
    from diffusers import FluxPipeline

    where = where or precision("flux")
    pipe = FluxPipeline.from_pretrained(str(weights.path), use_safetensors=True, **dtype_kwargs(where.dtype))
    pipe.set_progress_bar_config(disable=True)
    cast(pipe.vae, where.vae_dtype)
    if where.device == "cuda" and needs_offload(weights_bytes(weights.path),
                                                torch.cuda.get_device_properties(0).total_memory, options.cpu_offload):
        pipe.enable_model_cpu_offload()
    else:
        place(pipe, where.device)
    return pipe


def run(plan: Plan, ctx: ToolContext) -> list[Path]:
    """Generate ``plan.samples`` images into ``ctx.output_dir`` as ``0.png`` ….

    Raises:
        ToolError: the LoRA does not fit the transformer.
        easel.tools.base.TaskKilled: (from ``ctx.progress``) when the task was killed.
    """
    models = ctx.models
    loaded = models.base_pipeline("flux", plan.base,
                                  lambda: load_pipeline(plan.base, models.options, models.precision("flux")))
    pipe = loaded.obj
    ctx.log(loaded.describe(f"base model {plan.base_label}"))
    state = models.adapters(pipe, hotswap=True)
    t0 = time.perf_counter()
    try:
        state.apply(pipe, [(plan.lora.key, plan.lora.path, plan.lora.scale)] if plan.lora else [])
    except ValueError as exc:
        raise ToolError(str(exc)) from None
    ctx.log(f"{state.last_action} ({time.perf_counter() - t0:.2f} s)")
    if models.options.torch_compile and not getattr(pipe, "_easel_compiled", False):
        pipe.transformer.compile()  # after the first LoRA: later ones hot-swap without recompiling
        pipe._easel_compiled = True

    def on_step_end(pipe_, step, _timestep, callback_kwargs):
        preview = None
        if ctx.wants_preview(step + 1, plan.steps):
            # packed [B, seq, 64] → [B, 16, h, w], the layout the VAE decodes
            latents = pipe_._unpack_latents(callback_kwargs["latents"][:1], plan.height, plan.width,
                                            pipe_.vae_scale_factor)
            preview = latent_to_jpeg(latents[0], "flux")
        ctx.progress(step + 1, plan.steps, preview)
        return callback_kwargs

    ctx.started()
    images = pipe(
        prompt=plan.prompt, num_images_per_prompt=plan.samples, num_inference_steps=plan.steps,
        guidance_scale=plan.guidance_scale, width=plan.width, height=plan.height,
        generator=generators(plan.seed, plan.samples),
        callback_on_step_end=on_step_end,
    ).images

    lora_text = f"{plan.lora.label}:{plan.lora.scale:g}" if plan.lora else "none"
    params = {"tool": plan.tool, "model": plan.base_label, "prompt": plan.prompt, "steps": plan.steps,
              "guidance_scale": plan.guidance_scale, "width": plan.width, "height": plan.height,
              "loras": [{"name": plan.lora.label, "scale": plan.lora.scale}] if plan.lora else []}
    return write_pngs(images, ctx.output_dir, plan.seed, lambda seed: (
        f"{plan.prompt}\nSteps: {plan.steps}, Sampler: FlowMatchEulerDiscreteScheduler, Distilled CFG scale: "
        f"{plan.guidance_scale:g}, Seed: {seed}, Size: {plan.width}x{plan.height}, Model: {plan.base_label}, "
        f"LoRAs: {lora_text}"), params)
