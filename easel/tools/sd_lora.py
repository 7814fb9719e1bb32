"""``wiro/text-to-image-sd-lora``: Stable Diffusion 1.5-family text-to-image with several LoRAs.

Inputs (schema: ``easel/catalog/tools/wiro__text-to-image-sd-lora.json``) map to diffusers'
``StableDiffusionPipeline`` as follows:

=============================  ==============================================================
Wiro field                     diffusers
=============================  ==============================================================
``selectedModel``              checkpoint (``from_pretrained`` folder or ``from_single_file``)
``selectedLoraModel``          LoRA adapters, each at its ``generatesettings`` scale
``selectedLoraModelPrivateUrl``  one more LoRA from a user URL (safe fetcher), scale 1.0
``prompt`` / ``negativePrompt``  ``prompt`` / ``negative_prompt``; with A1111 weights
                               (``(word:1.2)``, ``[word]``) or beyond 75 tokens, embeddings
                               from :func:`easel.pipelines.prompts.encode_sd15` (chunks, weights)
``samples``                    ``num_images_per_prompt`` (image *i* uses seed ``seed + i``)
``steps``                      ``num_inference_steps``
``scale``                      ``guidance_scale``
``seed``                       ``torch.Generator`` seeds; empty, ``-1`` or non-numeric → random
``clipSkip``                   diffusers' ``clip_skip`` (0 = last CLIP layer)
``width`` / ``height``         ``width`` / ``height`` (multiples of 8)
``scheduler``                  scheduler class, ``from_config`` of the checkpoint's scheduler
=============================  ==============================================================

Outputs: ``0.png`` … ``N-1.png`` with the generation parameters in the PNG ``parameters`` text
chunk (A1111 style) and as JSON in ``easel``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from easel.net.fetch import FetchError
from easel.pipelines.checkpoints import read_pipeline
from easel.weights import LoraChoice, ModelError, Precision, Weights
from easel.weights.lora_formats import LoraFormatError
from easel.weights.precision import cast, generators, place, precision

from .base import ToolContext, ToolDeclaration, ToolError, ToolInputs, write_pngs
from .common import SD15, parse_seed, use_scheduler
from .previews import latent_to_jpeg

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import StableDiffusionPipeline

__all__ = ["TOOL", "Inputs", "Plan", "prepare", "run", "load_pipeline", "read_pipeline", "encode_prompt"]


class Inputs(ToolInputs):
    """The tool's inputs, as its catalog file declares them (checked when registered)."""

    selectedModel: str
    selectedModelPrivate: str = ""
    selectedLoraModel: list[str] = []
    selectedLoraModelPrivate: list[str] = []
    selectedLoraModelPrivateUrl: str = ""
    prompt: str = ""
    negativePrompt: str = ""
    samples: int = 1
    steps: int = 30
    scale: float = 7.5
    seed: str = ""
    clipSkip: int = 0
    width: int = 512
    height: int = 512
    scheduler: str = "EulerDiscreteScheduler"


TOOL = ToolDeclaration(
    name="wiro/text-to-image-sd-lora",
    catalog=Path(__file__).parents[1] / "catalog" / "tools" / "wiro__text-to-image-sd-lora.json",
    inputs=Inputs,
    family=SD15,
)


@dataclass(frozen=True)
class Plan:
    """Everything ``run`` needs, resolved in the preprocess stage."""

    checkpoint: Weights
    checkpoint_label: str
    loras: tuple[LoraChoice, ...]
    prompt: str
    negative_prompt: str
    samples: int
    steps: int
    guidance_scale: float
    seed: int
    clip_skip: int
    width: int
    height: int
    scheduler: str


def prepare(inputs: Inputs, ctx: ToolContext) -> Plan:
    """Resolve the checkpoint and LoRAs to local files (downloading if needed) and fix the seed.

    Raises:
        ToolError: an id of the wrong kind, an unset catalog source, or a refused LoRA URL.
    """
    models = ctx.models
    try:
        checkpoint = models.checkpoint(inputs.selectedModel, "selectedModel", (SD15.name,))
        loras = [models.lora(mid, "selectedLoraModel", "sd15-lora", inputs.scales) for mid in inputs.selectedLoraModel]
        private = models.private_lora(inputs.selectedLoraModelPrivateUrl, "selectedLoraModelPrivateUrl",
                                      "sd", ctx.input_file)
    except (ModelError, FetchError, LoraFormatError) as exc:
        raise ToolError(str(exc)) from None
    if private is not None:
        loras.append(private)
    seed = parse_seed(inputs.seed)
    ctx.log(f"seed={seed}")
    return Plan(
        checkpoint=checkpoint.weights, checkpoint_label=checkpoint.label, loras=tuple(loras),
        prompt=inputs.prompt, negative_prompt=inputs.negativePrompt, samples=inputs.samples, steps=inputs.steps,
        guidance_scale=inputs.scale, seed=seed, clip_skip=inputs.clipSkip, width=inputs.width,
        height=inputs.height, scheduler=inputs.scheduler or "EulerDiscreteScheduler",
    )


class PipelineCall(TypedDict, total=False):
    """The keyword arguments :func:`run` passes to ``StableDiffusionPipeline.__call__``: the text
    prompts, or their embeddings (weighted prompts, clip skip)."""

    num_images_per_prompt: int
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int
    generator: list[torch.Generator]
    prompt: str
    negative_prompt: str | None
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor


def load_pipeline(weights: Weights, where: Precision | None = None) -> "StableDiffusionPipeline":
    """Load a ``StableDiffusionPipeline`` from local weights on ``where.device``, UNet and text
    encoder in ``where.dtype``, VAE in ``where.vae_dtype`` (default: ``precision("sd15")``,
    float16 on CUDA, float32 on the CPU)."""
    where = where or precision(SD15.name)
    pipe = place(read_pipeline(weights, where.dtype), where.device)
    cast(pipe.vae, where.vae_dtype)
    return pipe


def encode_prompt(pipe: "StableDiffusionPipeline", prompts: list[str], clip_skip: int):
    """CLIP prompt embeddings with ``clip_skip`` final layers skipped.

    Mirrors diffusers' semantics (hidden state ``-(clip_skip + 1)`` passed through the final layer
    norm) without touching ``text_encoder.text_model``, which transformers 5 removed from
    ``CLIPTextModel`` (diffusers' own ``clip_skip`` path raises ``AttributeError`` there).

    Returns:
        Tensor ``[len(prompts), 77, hidden]`` on the text encoder's device and dtype.
    """
    import torch

    te = pipe.text_encoder
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(te.device)
    with torch.no_grad():
        out = te(ids, output_hidden_states=True)
        hidden = out.hidden_states[-(clip_skip + 1)]
        final_ln = getattr(te, "final_layer_norm", None) or te.text_model.final_layer_norm
        return final_ln(hidden)


def run(plan: Plan, ctx: ToolContext) -> list[Path]:
    """Generate ``plan.samples`` images and write them as ``0.png`` … into ``ctx.output_dir``.

    Raises:
        ToolError: a LoRA that does not fit the checkpoint, or an unknown scheduler.
        easel.tools.base.TaskKilled: (from ``ctx.progress``) when the task was killed.
    """
    from easel.pipelines.prompts import encode_sd15, needs_weighting

    models = ctx.models
    pipe = models.base_pipeline(SD15.name, plan.checkpoint,
                                lambda: load_pipeline(plan.checkpoint, models.precision(SD15.name))).obj
    use_scheduler(models, pipe, plan.scheduler)
    try:
        models.adapters(pipe).apply(pipe, [lora.triple for lora in plan.loras])
    except ValueError as exc:
        raise ToolError(str(exc)) from None

    kwargs = PipelineCall(
        num_images_per_prompt=plan.samples, num_inference_steps=plan.steps, guidance_scale=plan.guidance_scale,
        width=plan.width, height=plan.height, generator=generators(plan.seed, plan.samples),
    )
    if needs_weighting(pipe.tokenizer, plan.prompt, plan.negative_prompt):
        # A1111 weights or more than 75 tokens: chunked, weighted (easel.pipelines.prompts), with clip skip
        kwargs["prompt_embeds"], kwargs["negative_prompt_embeds"] = encode_sd15(
            pipe, plan.prompt, plan.negative_prompt, plan.clip_skip)
    elif plan.clip_skip > 0:
        kwargs["prompt_embeds"] = encode_prompt(pipe, [plan.prompt], plan.clip_skip)
        if plan.guidance_scale > 1:
            kwargs["negative_prompt_embeds"] = encode_prompt(pipe, [plan.negative_prompt], plan.clip_skip)
    else:
        kwargs["prompt"] = plan.prompt
        kwargs["negative_prompt"] = plan.negative_prompt or None

    def on_step_end(_pipe, step, _timestep, callback_kwargs):
        preview = None
        if ctx.wants_preview(step + 1, plan.steps):
            preview = latent_to_jpeg(callback_kwargs["latents"][0], SD15.name)
        ctx.progress(step + 1, plan.steps, preview)
        return callback_kwargs

    ctx.started()
    images = pipe(callback_on_step_end=on_step_end, **kwargs).images

    params = {
        "tool": TOOL.name, "model": plan.checkpoint_label, "prompt": plan.prompt, "negative_prompt": plan.negative_prompt,
        "steps": plan.steps, "guidance_scale": plan.guidance_scale, "scheduler": plan.scheduler,
        "clip_skip": plan.clip_skip, "width": plan.width, "height": plan.height,
        "loras": [{"name": lora.label, "scale": lora.scale} for lora in plan.loras],
    }
    loras = ", ".join(f"{lora.label}:{lora.scale:g}" for lora in plan.loras) or "none"
    return write_pngs(images, ctx.output_dir, plan.seed, lambda seed: (
        f"{plan.prompt}\nNegative prompt: {plan.negative_prompt}\nSteps: {plan.steps}, Sampler: {plan.scheduler}, "
        f"CFG scale: {plan.guidance_scale:g}, Seed: {seed}, Size: {plan.width}x{plan.height}, "
        f"Model: {plan.checkpoint_label}, Clip skip: {plan.clip_skip}, LoRAs: {loras}"), params)
