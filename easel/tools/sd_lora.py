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

import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from easel.weights import ModelError, Precision, dtype_kwargs
from easel.net.fetch import FetchError
from easel.weights.lora_formats import LoraFormatError
from easel.weights.precision import cast, generators, place, precision

from .base import ToolContext, ToolError, write_pngs
from .previews import latent_to_jpeg

TOOL = "wiro/text-to-image-sd-lora"

SCHEDULERS = (
    "EulerDiscreteScheduler", "DDIMScheduler", "LMSDiscreteScheduler", "DPMSolverMultistepScheduler",
    "PNDMScheduler", "DDPMScheduler", "EulerAncestralDiscreteScheduler",
)


@dataclass
class Plan:
    """Everything ``run`` needs, resolved in the preprocess stage."""

    checkpoint: Any  # easel.weights.Weights
    checkpoint_label: str
    loras: list[tuple[str, str, float, str]] = field(default_factory=list)  # key, path, scale, label
    prompt: str = ""
    negative_prompt: str = ""
    samples: int = 1
    steps: int = 30
    guidance_scale: float = 7.5
    seed: int = 0
    clip_skip: int = 0
    width: int = 512
    height: int = 512
    scheduler: str = "EulerDiscreteScheduler"


def parse_seed(value: Any) -> int:
    """Seed from the ``seed`` text field: a non-negative integer below 2**63, else a random one."""
    text = str(value).strip()
    if re.fullmatch(r"\d{1,19}", text) and int(text) < 2**63:
        return int(text)
    return secrets.randbelow(2**32)


def prepare(inputs: dict[str, Any], ctx: ToolContext) -> Plan:
    """Resolve the checkpoint and LoRAs to local files (downloading if needed) and fix the seed.

    Raises:
        ToolError: an id of the wrong kind, an unset catalog source, or a refused LoRA URL.
    """
    models = ctx.models
    try:
        checkpoint = models.checkpoint(inputs["selectedModel"], "selectedModel", ("sd15",))
        loras = [models.lora(mid, "selectedLoraModel", "sd15-lora", inputs) for mid in inputs.get("selectedLoraModel", [])]
        private = models.private_lora(inputs.get("selectedLoraModelPrivateUrl", ""), "selectedLoraModelPrivateUrl",
                                      "sd", ctx.input_file)
    except (ModelError, FetchError, LoraFormatError) as exc:
        raise ToolError(str(exc)) from None
    if private is not None:
        loras.append(private)
    seed = parse_seed(inputs.get("seed", ""))
    ctx.log(f"seed={seed}")
    return Plan(
        checkpoint=checkpoint.weights, checkpoint_label=checkpoint.label,
        loras=[(c.key, c.path, c.scale, c.label) for c in loras],
        prompt=inputs.get("prompt", ""), negative_prompt=inputs.get("negativePrompt", ""),
        samples=int(inputs["samples"]), steps=int(inputs["steps"]), guidance_scale=float(inputs["scale"]),
        seed=seed, clip_skip=int(inputs.get("clipSkip", 0)), width=int(inputs["width"]),
        height=int(inputs["height"]), scheduler=inputs.get("scheduler") or "EulerDiscreteScheduler",
    )


def read_pipeline(weights, dtype) -> Any:
    """Read a ``StableDiffusionPipeline`` in ``dtype`` from local weights (a diffusers folder or a
    single-file checkpoint), on the CPU, progress bar off. Every call builds new modules."""
    from diffusers import StableDiffusionPipeline

    kwargs = dict(**dtype_kwargs(dtype), safety_checker=None, requires_safety_checker=False)
    if weights.format == "diffusers":
        pipe = StableDiffusionPipeline.from_pretrained(str(weights.path), use_safetensors=True, **kwargs)
    else:
        if weights.config is not None:
            kwargs["config"] = str(weights.config)
        pipe = StableDiffusionPipeline.from_single_file(str(weights.path), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(weights, where: Precision | None = None) -> Any:
    """Load a ``StableDiffusionPipeline`` from local weights on ``where.device``, UNet and text
    encoder in ``where.dtype``, VAE in ``where.vae_dtype`` (default: ``precision("sd15")``,
    float16 on CUDA, float32 on the CPU)."""
    where = where or precision("sd15")
    pipe = place(read_pipeline(weights, where.dtype), where.device)
    cast(pipe.vae, where.vae_dtype)
    return pipe


def encode_prompt(pipe: Any, prompts: list[str], clip_skip: int):
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
    import diffusers

    from easel.pipelines.prompts import encode_sd15, needs_weighting

    models = ctx.models
    pipe = models.base_pipeline("sd15", plan.checkpoint,
                                lambda: load_pipeline(plan.checkpoint, models.precision("sd15"))).obj
    base_scheduler = getattr(pipe, "_easel_base_scheduler_config", None)
    if base_scheduler is None:
        base_scheduler = pipe._easel_base_scheduler_config = dict(pipe.scheduler.config)
    if plan.scheduler not in SCHEDULERS:
        raise ToolError(f"scheduler must be one of {', '.join(SCHEDULERS)}")
    if type(pipe.scheduler).__name__ != plan.scheduler:
        # a new scheduler (0.7 ms) only when the class changes: every instance is made from the
        # checkpoint's own config, and diffusers schedulers reset their per-run state in
        # set_timesteps, which every pipeline call makes first
        pipe.scheduler = getattr(diffusers, plan.scheduler).from_config(base_scheduler)
    try:
        models.adapters(pipe).apply(pipe, [(k, p, s) for k, p, s, _ in plan.loras])
    except ValueError as exc:
        raise ToolError(str(exc)) from None

    kwargs: dict[str, Any] = dict(
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
            preview = latent_to_jpeg(callback_kwargs["latents"][0], "sd15")
        ctx.progress(step + 1, plan.steps, preview)
        return callback_kwargs

    ctx.started()
    images = pipe(callback_on_step_end=on_step_end, **kwargs).images

    params = {
        "tool": TOOL, "model": plan.checkpoint_label, "prompt": plan.prompt, "negative_prompt": plan.negative_prompt,
        "steps": plan.steps, "guidance_scale": plan.guidance_scale, "scheduler": plan.scheduler,
        "clip_skip": plan.clip_skip, "width": plan.width, "height": plan.height,
        "loras": [{"name": label, "scale": s} for _, _, s, label in plan.loras],
    }
    loras = ", ".join(f"{label}:{s:g}" for _, _, s, label in plan.loras) or "none"
    return write_pngs(images, ctx.output_dir, plan.seed, lambda seed: (
        f"{plan.prompt}\nNegative prompt: {plan.negative_prompt}\nSteps: {plan.steps}, Sampler: {plan.scheduler}, "
        f"CFG scale: {plan.guidance_scale:g}, Seed: {seed}, Size: {plan.width}x{plan.height}, "
        f"Model: {plan.checkpoint_label}, Clip skip: {plan.clip_skip}, LoRAs: {loras}"), params)
