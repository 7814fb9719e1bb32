"""What several tools share, written once: the checkpoint families (SD 1.5, SDXL, FLUX.1) with
their dtype rows, tiny stand-ins and preview factors; seed parsing; the scheduler swap; LoRA
checks; the GPU offload rule. Tools import this module, never each other.
"""
from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from easel.net.fetch import FetchError
from easel.weights import Checkpoint, LoraChoice, Precision, RuntimeOptions, Weights, dtype_kwargs
from easel.weights.cache import PipelineState
from easel.weights.lora_formats import LoraFormatError, require_family
from easel.weights.precision import cast, generators, place, precision

from .base import DtypeKind, Family, Preview, TinySource, ToolContext, ToolError, write_pngs
from .previews import latent_to_jpeg

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import FluxPipeline

    from easel.weights import ModelManager

# -- the checkpoint families ------------------------------------------------------------------
# Latent → RGB factors: the well-known approximations fitted for each VAE (the values ComfyUI uses
# for its "latent2rgb" previews).

SD15 = Family(
    name="sd15",
    # float16 VAE, decoded in float16 as diffusers' SD 1.5 pipeline does
    precision=DtypeKind("sd15", "float16", "float16"),
    preview=Preview(((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721),
                     (-0.2120, -0.2616, -0.7177))),
    tiny=TinySource("sd15", single_file="sd15-single-file", lora_prefix="sd15-lora"),
    random=True,
)
SDXL = Family(
    name="sdxl",
    # the SDXL VAE overflows in float16: held in float32 when its config says force_upcast
    precision=DtypeKind("sdxl", "float16", "float16", vae_upcast=True),
    tiny=TinySource("sdxl", single_file="sdxl-single-file", lora_prefix="sdxl-lora"),
    random=True,
)
FLUX = Family(
    name="flux",
    precision=DtypeKind("flux", "bfloat16", "bfloat16"),
    preview=Preview(((-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433),
                     (-0.0174, 0.0160, 0.0617), (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115),
                     (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259), (-0.0245, 0.0250, 0.1180),
                     (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
                     (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499),
                     (-0.1262, -0.0982, -0.0778)), bias=(-0.0329, -0.0718, -0.0851)),
    tiny=TinySource("flux", lora_prefix="flux-lora"),
    random=True,
)

# the schedulers an epsilon-prediction SD / SDXL checkpoint can run with (diffusers class names)
SCHEDULERS = (
    "EulerDiscreteScheduler", "DDIMScheduler", "LMSDiscreteScheduler", "DPMSolverMultistepScheduler",
    "PNDMScheduler", "DDPMScheduler", "EulerAncestralDiscreteScheduler",
)


def parse_seed(value: str) -> int:
    """Seed from the ``seed`` text field: a non-negative integer below 2**63, else (empty, ``-1``,
    non-numeric) a random one below 2**32."""
    text = str(value).strip()
    if re.fullmatch(r"\d{1,19}", text) and int(text) < 2**63:
        return int(text)
    return secrets.randbelow(2**32)


def check_scheduler(name: str) -> None:
    """Refuse a scheduler that is not one of :data:`SCHEDULERS`.

    Raises:
        ToolError: naming the allowed ones.
    """
    if name not in SCHEDULERS:
        raise ToolError(f"scheduler must be one of {', '.join(SCHEDULERS)}")


def use_scheduler(models: "ModelManager", pipe: object, name: str, always: bool = False) -> None:
    """Give ``pipe`` (a diffusers pipeline) the scheduler class ``name``, made ``from_config`` of
    the checkpoint's own scheduler config (kept in the pipeline's typed cache state the first
    time, :class:`easel.weights.cache.PipelineState`).

    A new scheduler (0.7 ms) is made only when the class changes (or ``always``): diffusers
    schedulers reset their per-run state in ``set_timesteps``, which every pipeline call makes first.

    Raises:
        ToolError: ``name`` is not one of :data:`SCHEDULERS`.
    """
    import diffusers

    check_scheduler(name)
    state = models.state(pipe, PipelineState)
    scheduler = getattr(pipe, "scheduler")
    if state.base_scheduler is None:
        state.base_scheduler = dict(scheduler.config)
    if always or type(scheduler).__name__ != name:
        setattr(pipe, "scheduler", getattr(diffusers, name).from_config(state.base_scheduler))


def checked_lora(choice: LoraChoice, family: str, field: str, scale: float | None = None) -> LoraChoice:
    """``choice`` after checking that its file is a LoRA of ``family`` (``sd`` or ``flux``), with
    its key layout filled in (and ``scale`` when given).

    Raises:
        ToolError: the file was made for another family, or its layout is unknown (naming ``field``).
    """
    try:
        layout = require_family(choice.path, family, field)
    except (LoraFormatError, FetchError) as exc:
        raise ToolError(str(exc)) from None
    return LoraChoice(choice.key, choice.path, choice.scale if scale is None else scale, choice.label, layout.layout)


def safetensors_bytes(folder: Path) -> int:
    """Bytes of the ``.safetensors`` files under a diffusers folder (what the GPU must hold)."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*.safetensors"))


def needs_offload(model_bytes: int, gpu_total_bytes: int, forced: bool, headroom: float = 1.25) -> bool:
    """Whether to use model CPU offload: when forced, or when the GPU's memory is smaller than the
    weights plus ``headroom`` (activations, VAE decode at 1024², CUDA context; 25 % by default).

    FLUX.1-dev in bf16 is ~33 GB on disk (transformer 23.8 GB, T5-XXL 9.5 GB), so a 24 GB card
    offloads and an 80 GB card does not.
    """
    return forced or gpu_total_bytes < model_bytes * headroom


# -- FLUX.1 text-to-image with one LoRA (the FLUX tools' pipeline, progress and outputs) ---------

@dataclass(frozen=True)
class FluxPlan:
    """Everything :func:`run_flux` needs, resolved in a FLUX tool's preprocess stage."""

    tool: str
    base: Checkpoint
    lora: LoraChoice | None
    prompt: str
    samples: int
    steps: int
    guidance_scale: float
    seed: int
    width: int
    height: int


def flux_plan(tool: str, base: Checkpoint, lora: LoraChoice | None, prompt: str, samples: int, steps: int,
              scale: float, seed: str, width: int, height: int, log: "Callable[[str], None]") -> FluxPlan:
    """The plan of a FLUX tool for a base model and a LoRA: the seed fixed (:func:`parse_seed`)
    and logged with the LoRA."""
    fixed = parse_seed(seed)
    log(f"seed={fixed}")
    if lora is not None:
        log(f"LoRA {lora.label} ({lora.layout} layout) at scale {lora.scale:g}")
    return FluxPlan(tool=tool, base=base, lora=lora, prompt=prompt, samples=samples, steps=steps,
                    guidance_scale=scale, seed=fixed, width=width, height=height)


def load_flux_pipeline(weights: Weights, options: RuntimeOptions, where: Precision | None = None) -> "FluxPipeline":
    """Load a ``FluxPipeline`` from a local diffusers folder, in ``where``'s dtypes on its device
    (default ``precision("flux")``: bfloat16 on CUDA, float32 on the CPU).

    On CUDA, ``enable_model_cpu_offload`` when :func:`needs_offload` says so (``options.cpu_offload``,
    an :class:`easel.weights.RuntimeOptions`, forces it).
    """
    import torch
    from diffusers import FluxPipeline

    where = where or precision(FLUX.name)
    pipe = FluxPipeline.from_pretrained(str(weights.path), use_safetensors=True, **dtype_kwargs(where.dtype))
    pipe.set_progress_bar_config(disable=True)
    cast(pipe.vae, where.vae_dtype)
    if where.device == "cuda" and needs_offload(safetensors_bytes(weights.path),
                                                torch.cuda.get_device_properties(0).total_memory, options.cpu_offload):
        pipe.enable_model_cpu_offload()
    else:
        place(pipe, where.device)
    return pipe


def run_flux(plan: FluxPlan, ctx: ToolContext) -> list[Path]:
    """The FLUX tools' ``run``: generate ``plan.samples`` images into ``ctx.output_dir`` as ``0.png`` ….

    Raises:
        ToolError: the LoRA does not fit the transformer.
        easel.tools.base.TaskKilled: (from ``ctx.progress``) when the task was killed.
    """
    models = ctx.models
    base = plan.base
    loaded = models.base_pipeline(FLUX.name, base.weights,
                                  lambda: load_flux_pipeline(base.weights, models.options, models.precision(FLUX.name)))
    pipe = loaded.obj
    ctx.log(loaded.describe(f"base model {base.label}"))
    adapters = models.adapters(pipe, hotswap=True)
    t0 = time.perf_counter()
    try:
        adapters.apply(pipe, [plan.lora.triple] if plan.lora else [])
    except ValueError as exc:
        raise ToolError(str(exc)) from None
    ctx.log(f"{adapters.last_action} ({time.perf_counter() - t0:.2f} s)")
    state = models.state(pipe, PipelineState)
    if models.options.torch_compile and not state.compiled:
        pipe.transformer.compile()  # after the first LoRA: later ones hot-swap without recompiling
        state.compiled = True

    def on_step_end(pipe_, step, _timestep, callback_kwargs):
        preview = None
        if ctx.wants_preview(step + 1, plan.steps):
            # packed [B, seq, 64] → [B, 16, h, w], the layout the VAE decodes
            latents = pipe_._unpack_latents(callback_kwargs["latents"][:1], plan.height, plan.width,
                                            pipe_.vae_scale_factor)
            preview = latent_to_jpeg(latents[0], FLUX.name)
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
    params = {"tool": plan.tool, "model": base.label, "prompt": plan.prompt, "steps": plan.steps,
              "guidance_scale": plan.guidance_scale, "width": plan.width, "height": plan.height,
              "loras": [{"name": plan.lora.label, "scale": plan.lora.scale}] if plan.lora else []}
    return write_pngs(images, ctx.output_dir, plan.seed, lambda seed: (
        f"{plan.prompt}\nSteps: {plan.steps}, Sampler: FlowMatchEulerDiscreteScheduler, Distilled CFG scale: "
        f"{plan.guidance_scale:g}, Seed: {seed}, Size: {plan.width}x{plan.height}, Model: {base.label}, "
        f"LoRAs: {lora_text}"), params)
