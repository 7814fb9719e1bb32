"""``wiro/ic-light-background``: IC-Light relighting of a foreground subject to fit a background.

Follows the reference procedure of lllyasviel/IC-Light (``gradio_demo_bg.py``, "fbc" model:
foreground + background conditioned), re-implemented in :mod:`easel.pipelines.ic_light`:

1. **Model.** The SD 1.5 base UNet's ``conv_in`` is widened from 4 to 12 input channels (the new
   8 zero, the old weights and bias kept), then the fbc offset file is *added* to every UNet
   weight (``merged = base + offset``, once: the result is a derived pipeline cached under its
   own key, never the SD tool's pipeline). On every UNet call the foreground and background
   latents are concatenated to the noisy latent as 8 extra channels (:func:`easel.pipelines.ic_light.install_concat_hook`).
2. **Matting.** RMBG-1.4 (:mod:`easel.pipelines.rmbg`) on the foreground at about 1024² pixels
   (``64 · round(W · √(256 / (W·H)))`` wide), the matte resized back bilinearly, and the
   foreground composited on grey: ``127 + (fg - 127) · alpha``.
3. **Background.** As given, flipped left-right, or (beyond the seed) one of the reference's
   other light sources: a left/right/top/bottom gradient (224 → 32) or flat grey (64).
4. **Low-res pass.** At the foreground's size fitted into the reference's size-slider range,
   256 to 1024 per side in multiples of 64, keeping its aspect (:func:`easel.pipelines.ic_light.lowres_size`; 1/8 of that
   range with the tiny test model): fg and bg resized to cover and
   centre-cropped (Lanczos), VAE-encoded (distribution mode × scaling factor) as the concat
   conditioning; text-to-image with ``steps`` steps and CFG ``scale``.
5. **High-res pass.** Decode, resize by ``highres_scale`` (rounded to multiples of 64, Lanczos),
   re-encode, recompute the conditioning at the new size, image-to-image with strength
   ``highres_denoise`` and ``round(steps / highres_denoise)`` scheduled steps (so about
   ``steps`` are run).
6. Decode; PNGs at the final size.

Both passes use the reference's scheduler, DPM++ 2M SDE with Karras sigmas
(``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True,
steps_offset=1)``), one ``torch.Generator`` seeded with ``seed`` for both passes and all
samples (as the reference: samples are one batch; the generator lives on the CPU so results do
not depend on the device's RNG), the prompt ``prompt + ", best quality"`` (the reference's default
added prompt) and ``negativePrompt``, both encoded in 75-token chunks. On CUDA the UNet and text
encoder run in float16 and the VAE in bfloat16, as the reference (``easel.weights.precision``, kind
``ic-light``; RMBG stays float32, kind ``matting``); on the CPU everything is float32, or the CUDA
dtypes with ``Settings.cpu_precision = "half"``.

Deviations, all for inputs the reference cannot take: an empty prompt is one empty chunk (the
reference crashes), a matting feed side is at least 64 pixels, ``highres_denoise`` is at least 0.1.

Inputs (schema ``easel/catalog/tools/wiro__ic-light-background.json``): ``selectedModel`` (SD 1.5
checkpoint; ``selectedModelPrivate`` is accepted and ignored), ``inputImageUrl`` (background),
``inputImage2Url`` (foreground), ``prompt``, ``negativePrompt``, ``samples``, ``steps``,
``scale``, ``highres_scale``, ``highres_denoise``, ``seed``, ``bg_source``; beyond Wiro
``extraOutputs`` (adds ``extra-foreground.png``, ``extra-alpha.png``, ``extra-background.png``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from easel.catalog import InputError, load_tools
from easel.pipelines.ic_light import (ADDED_PROMPT, BG_SOURCES, MAX_SIDE, MIN_SIDE, PHASES, UPLOAD, highres_steps,
                                      load_iclight, lowres_size, process)
from easel.weights import Checkpoint, ModelError, Weights

from .base import (DtypeKind, Family, Phases, PngJob, ToolContext, ToolDeclaration, ToolError, ToolInputs,
                   save_pngs)
from .common import SD15, parse_seed
from .previews import latent_to_jpeg

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

__all__ = ["TOOL", "Inputs", "Plan", "prepare", "run", "highres_rule", "lowres_size", "BG_SOURCES", "UPLOAD",
           "MIN_SIDE", "MAX_SIDE", "process", "load_iclight"]

MATTING = DtypeKind("matting", "float32", "float32")  # RMBG-1.4: float32 everywhere, as the reference
# IC-Light's own family: its pipeline is more than a checkpoint (the offset UNet, matting); UNet and
# text encoder in float16 and the VAE in bfloat16, as gradio_demo_bg.py
IC_LIGHT = Family(name="ic-light", precision=DtypeKind("ic-light", "float16", "bfloat16"), components=(MATTING,))


class Inputs(ToolInputs):
    """The tool's inputs, as its catalog file declares them (checked when registered)."""

    selectedModel: str
    selectedModelPrivate: str = ""
    inputImageUrl: str = ""
    inputImage2Url: str = ""
    prompt: str = ""
    negativePrompt: str = ""
    samples: int = 1
    steps: int = 30
    scale: float = 2.0
    highres_scale: float = 1.5
    highres_denoise: float = 0.5
    seed: str = ""
    bg_source: str = UPLOAD
    extraOutputs: str = "false"


def highres_rule(inputs: Inputs) -> None:
    """Refuse ``steps`` / ``highres_denoise`` pairs whose high-res pass would run no step (e.g.
    ``steps=1`` with ``highres_denoise`` ≥ 0.67: one step scheduled, ``int(0.67)`` = 0 run, and
    diffusers fails on an empty schedule). The message names ``highres_denoise`` and the
    smallest ``steps`` that works with it. A submission rule (:mod:`easel.catalog.rules`).

    Raises:
        InputError: naming ``highres_denoise``.
    """
    steps, denoise = inputs.steps, inputs.highres_denoise
    if denoise <= 0:
        return
    scheduled, ran = highres_steps(steps, denoise)
    if ran >= 1:
        return
    enough = next((n for n in range(steps + 1, 1001) if highres_steps(n, denoise)[1] >= 1), None)
    hint = f"use steps of at least {enough}" if enough else "use more steps"
    raise InputError("highres_denoise", (
        f"Request parameter [highres_denoise] {denoise:g} with [steps] {steps} runs no high-resolution "
        f"step (round({steps} / {denoise:g}) = {scheduled} scheduled, int({scheduled} x {denoise:g}) = {ran} run); "
        f"{hint}, or a highres_denoise of 1"))


TOOL = ToolDeclaration(
    name="wiro/ic-light-background",
    catalog=Path(__file__).parents[1] / "catalog" / "tools" / "wiro__ic-light-background.json",
    inputs=Inputs,
    family=IC_LIGHT,
    uses=(SD15,),
    rules=(highres_rule,),
)


@dataclass(frozen=True)
class Plan:
    """Everything :func:`run` needs, resolved and decoded in the preprocess stage."""

    checkpoint: Checkpoint
    offset: Weights
    matting: Weights
    fg: "Image"  # RGB
    bg: "Image"  # RGB
    prompt: str
    negative_prompt: str
    samples: int
    steps: int
    cfg: float
    highres_scale: float
    highres_denoise: float
    seed: int
    bg_source: str
    width: int
    height: int


def prepare(inputs: Inputs, ctx: ToolContext) -> Plan:
    """Resolve the checkpoint, the IC-Light offset and the matting weights; decode both images.

    Raises:
        ToolError: an unknown/non-SD-1.5 model, an unset source, an unreadable image (naming its field).
    """
    preset = load_tools()[TOOL.name].preset
    try:
        checkpoint = ctx.models.checkpoint(inputs.selectedModel, "selectedModel", (SD15.name,))
        _, offset = ctx.models.component_weights(str(preset.get("offset", "iclight-sd15-fbc")), ("sd15-iclight",))
        _, matting = ctx.models.component_weights(str(preset.get("matting", "rmbg-1.4")), ("matting",))
    except ModelError as exc:
        raise ToolError(str(exc)) from None
    bg_source = inputs.bg_source or UPLOAD
    if bg_source not in BG_SOURCES:
        raise ToolError(f"Request parameter [bg_source] must be one of: {', '.join(BG_SOURCES)}")
    fg = ctx.image("inputImage2Url", inputs.inputImage2Url).convert("RGB")
    bg = ctx.image("inputImageUrl", inputs.inputImageUrl).convert("RGB")
    tiny = ctx.models.tiny  # the tiny model's range is 1/8 of the reference's
    width, height = lowres_size(*fg.size, *((MIN_SIDE // 8, MAX_SIDE // 8) if tiny else (MIN_SIDE, MAX_SIDE)))
    seed = parse_seed(inputs.seed)
    ctx.log(f"seed={seed} foreground {fg.size[0]}x{fg.size[1]} background {bg.size[0]}x{bg.size[1]} "
            f"low-res {width}x{height}")
    return Plan(checkpoint=checkpoint, offset=offset, matting=matting, fg=fg, bg=bg,
                prompt=inputs.prompt, negative_prompt=inputs.negativePrompt,
                samples=inputs.samples, steps=inputs.steps, cfg=inputs.scale,
                highres_scale=inputs.highres_scale, highres_denoise=inputs.highres_denoise,
                seed=seed, bg_source=bg_source, width=width, height=height)


def run(plan: Plan, ctx: ToolContext) -> list[Path]:
    """Relight ``plan.samples`` images and write ``0.png`` … (and the extras when asked).

    Raises:
        ToolError: the offset does not fit the checkpoint, or the matting weights are not RMBG-1.4.
        easel.tools.base.TaskKilled: (from ``ctx.progress``) when the task was killed.
    """
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from easel.pipelines.rmbg import load_rmbg

    models = ctx.models
    where = models.precision(IC_LIGHT.name)
    try:
        loaded = models.derived_pipeline(SD15.name, plan.checkpoint.weights, f"iclight-fbc:{plan.offset.key}",
                                         lambda: load_iclight(plan.checkpoint.weights, plan.offset.path,
                                                              plan.offset.key, where))
        ctx.log(loaded.describe(f"IC-Light model ({plan.checkpoint.label} + fbc offset)"))
        device = models.precision(MATTING.name).device
        rmbg = models.component(MATTING.name, plan.matting, lambda w: load_rmbg(w.path, device))
        ctx.log(rmbg.describe("RMBG-1.4 matting"))
    except ValueError as exc:
        raise ToolError(str(exc)) from None
    _, hi_run = highres_steps(plan.steps, plan.highres_denoise)
    bar = Phases(ctx, [(PHASES[0], 1), (PHASES[1], plan.steps), (PHASES[2], hi_run)])

    def on_step(phase, latents):
        preview = latent_to_jpeg(latents[0], SD15.name) if latents is not None and bar.wants_preview() else None
        bar.step(phase, preview)

    ctx.started()
    results, extras = process(loaded.obj, rmbg.obj, plan.fg, plan.bg, plan.bg_source, plan.prompt,
                              plan.negative_prompt, plan.samples, plan.seed, plan.steps, plan.cfg,
                              plan.highres_scale, plan.highres_denoise, on_step, (plan.width, plan.height))
    h, w = results[0].shape[:2]
    params = {"tool": TOOL.name, "model": plan.checkpoint.label, "prompt": plan.prompt,
              "negative_prompt": plan.negative_prompt, "steps": plan.steps, "guidance_scale": plan.cfg,
              "highres_scale": plan.highres_scale, "highres_denoise": plan.highres_denoise,
              "bg_source": plan.bg_source, "seed": plan.seed, "width": w, "height": h}
    jobs: list[PngJob] = []
    for i, image in enumerate(results):
        info = PngInfo()
        info.add_text("parameters", f"{plan.prompt}, {ADDED_PROMPT}\nNegative prompt: {plan.negative_prompt}\n"
                                    f"Steps: {plan.steps}, Sampler: DPM++ 2M SDE Karras, CFG scale: {plan.cfg:g}, "
                                    f"Seed: {plan.seed}, Sample: {i}, Size: {w}x{h}, Model: {plan.checkpoint.label}, "
                                    f"IC-Light: fbc, Background: {plan.bg_source}, Hires upscale: "
                                    f"{plan.highres_scale:g}, Denoising strength: {plan.highres_denoise:g}")
        info.add_text("easel", json.dumps({**params, "sample": i}, sort_keys=True))
        jobs.append(PngJob(Image.fromarray(image), ctx.output_dir / f"{i}.png", info))
    paths = save_pngs(jobs)
    for name, image in extras.items():
        ctx.extra_output(name, image)
    return paths
