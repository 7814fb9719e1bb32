"""``example/text-to-image-sdxl-lora``: SDXL text-to-image with one LoRA, an Easel tool plug-in.

A whole tool is this module and its catalog file (``example__text-to-image-sdxl-lora.json``
beside it), registered in the ``easel.tools`` entry-point group by this package's
``pyproject.toml``. It runs on the SDXL family Easel already declares (dtypes, Celery queue,
tiny stand-ins), so it declares no family of its own.

=============================  ==============================================================
Wiro field                     diffusers ``StableDiffusionXLPipeline``
=============================  ==============================================================
``selectedModel``              an SDXL checkpoint of the catalog (folder or single file)
``selectedLoraModel``          one SDXL LoRA of the catalog, at its scale setting (the request
                               may send that setting's id, e.g. ``pixel-art-xl: 0.8``)
``prompt`` / ``negativePrompt``  ``prompt`` / ``negative_prompt``
``samples``                    ``num_images_per_prompt`` (image *i* uses seed ``seed + i``)
``steps`` / ``scale``          ``num_inference_steps`` / ``guidance_scale``
``seed``                       CPU ``torch.Generator`` seeds; empty or non-numeric → random
``width`` / ``height``         ``width`` / ``height`` (multiples of 8)
``scheduler``                  scheduler class, ``from_config`` of the checkpoint's own
=============================  ==============================================================
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from easel.tools.base import ToolContext, ToolDeclaration, ToolError, ToolInputs, write_pngs
from easel.tools.common import SDXL, parse_seed, use_scheduler
from easel.weights import Checkpoint, LoraChoice, ModelError, Weights
from easel.weights.precision import cast, generators, place


class Inputs(ToolInputs):
    """The inputs of the catalog file, typed (checked against it when Easel registers the tool)."""

    selectedModel: str
    selectedLoraModel: str = ""
    prompt: str = ""
    negativePrompt: str = ""
    samples: int = 1
    steps: int = 30
    scale: float = 7.0
    seed: str = ""
    width: int = 1024
    height: int = 1024
    scheduler: str = "EulerDiscreteScheduler"


TOOL = ToolDeclaration(
    name="example/text-to-image-sdxl-lora",
    catalog=Path(__file__).with_name("example__text-to-image-sdxl-lora.json"),
    inputs=Inputs,
    family=SDXL,
)


@dataclass(frozen=True)
class Plan:
    """What :func:`run` needs, resolved by :func:`prepare`."""

    checkpoint: Checkpoint
    lora: LoraChoice | None
    prompt: str
    negative_prompt: str
    samples: int
    steps: int
    guidance_scale: float
    seed: int
    width: int
    height: int
    scheduler: str


def prepare(inputs: Inputs, ctx: ToolContext) -> Plan:
    """Resolve the checkpoint and the LoRA to local files (downloading them in hub mode).

    Raises:
        ToolError: an id of the wrong kind, or a catalog entry without a weights source.
    """
    models = ctx.models
    try:
        checkpoint = models.checkpoint(inputs.selectedModel, "selectedModel", (SDXL.name,))
        lora = models.lora(inputs.selectedLoraModel, "selectedLoraModel", "sdxl-lora", inputs.scales) \
            if inputs.selectedLoraModel else None
    except ModelError as exc:
        raise ToolError(str(exc)) from None
    seed = parse_seed(inputs.seed)
    ctx.log(f"seed={seed}")
    return Plan(checkpoint=checkpoint, lora=lora, prompt=inputs.prompt, negative_prompt=inputs.negativePrompt,
                samples=inputs.samples, steps=inputs.steps, guidance_scale=inputs.scale, seed=seed,
                width=inputs.width, height=inputs.height, scheduler=inputs.scheduler)


def load_pipeline(weights: Weights, ctx: ToolContext):
    """A ``StableDiffusionXLPipeline`` from local weights, in the SDXL family's dtypes on this
    worker's device (the VAE in float32 when its config says ``force_upcast``)."""
    from easel.pipelines.checkpoints import read_sdxl

    where = ctx.models.precision(SDXL.name)
    pipe = read_sdxl(weights, where.dtype)
    place(pipe, where.device)
    cast(pipe.vae, where.vae_dtype_for(pipe.vae))
    return pipe


def run(plan: Plan, ctx: ToolContext) -> list[Path]:
    """Generate ``plan.samples`` images as ``0.png`` … in ``ctx.output_dir``.

    Raises:
        ToolError: the LoRA does not fit the checkpoint.
        easel.tools.base.TaskKilled: (from ``ctx.progress``) when the task was killed.
    """
    models = ctx.models
    weights = plan.checkpoint.weights
    loaded = models.base_pipeline(SDXL.name, weights, lambda: load_pipeline(weights, ctx))
    ctx.log(loaded.describe(f"model {plan.checkpoint.label}"))
    pipe = loaded.obj
    use_scheduler(models, pipe, plan.scheduler)
    try:
        models.adapters(pipe).apply(pipe, [plan.lora.triple] if plan.lora else [])
    except ValueError as exc:
        raise ToolError(str(exc)) from None

    def on_step_end(_pipe, step, _timestep, callback_kwargs):
        ctx.progress(step + 1, plan.steps)
        return callback_kwargs

    ctx.started()
    images = pipe(prompt=plan.prompt, negative_prompt=plan.negative_prompt or None,
                  num_images_per_prompt=plan.samples, num_inference_steps=plan.steps,
                  guidance_scale=plan.guidance_scale, width=plan.width, height=plan.height,
                  generator=generators(plan.seed, plan.samples), callback_on_step_end=on_step_end).images
    lora = f"{plan.lora.label}:{plan.lora.scale:g}" if plan.lora else "none"
    params = {"tool": TOOL.name, "model": plan.checkpoint.label, "prompt": plan.prompt,
              "negative_prompt": plan.negative_prompt, "steps": plan.steps, "guidance_scale": plan.guidance_scale,
              "scheduler": plan.scheduler, "width": plan.width, "height": plan.height,
              "loras": [{"name": plan.lora.label, "scale": plan.lora.scale}] if plan.lora else []}
    return write_pngs(images, ctx.output_dir, plan.seed, lambda seed: (
        f"{plan.prompt}\nNegative prompt: {plan.negative_prompt}\nSteps: {plan.steps}, Sampler: {plan.scheduler}, "
        f"CFG scale: {plan.guidance_scale:g}, Seed: {seed}, Size: {plan.width}x{plan.height}, "
        f"Model: {plan.checkpoint.label}, LoRA: {lora}"), params)
