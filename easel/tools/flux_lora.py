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
the resident transformer (``easel.weights.cache.LoraState``; the pipeline, progress and outputs
are :func:`easel.tools.common.run_flux`, shared with the other FLUX tools), so a ``torch.compile``-d transformer
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

from pathlib import Path

from easel.net.fetch import FetchError
from easel.weights import ModelError
from easel.weights.lora_formats import LoraFormatError

from .base import ToolContext, ToolDeclaration, ToolError, ToolInputs
from .common import FLUX, FluxPlan, checked_lora, flux_plan, load_flux_pipeline, needs_offload, run_flux
from .common import safetensors_bytes as weights_bytes

__all__ = ["TOOL", "Inputs", "Plan", "prepare", "run", "load_pipeline", "needs_offload", "weights_bytes"]

Plan = FluxPlan
load_pipeline = load_flux_pipeline


class Inputs(ToolInputs):
    """The tool's inputs, as its catalog file declares them (checked when registered)."""

    selectedLoraModel: str = ""
    selectedLoraModelPrivate: str = ""
    selectedLoraModelPrivateUrl: str = ""
    prompt: str = ""
    steps: int = 20
    scale: float = 3.5
    samples: int = 1
    seed: str = ""
    width: int = 1024
    height: int = 1024


TOOL = ToolDeclaration(
    name="wiro/text-to-image-flux-lora-fast",
    catalog=Path(__file__).parents[1] / "catalog" / "tools" / "wiro__text-to-image-flux-lora-fast.json",
    inputs=Inputs,
    family=FLUX,
)


def prepare(inputs: Inputs, ctx: ToolContext) -> FluxPlan:
    """Resolve the base model and the LoRA (catalog id, or the private URL which replaces it).

    Raises:
        ToolError: a non-Flux LoRA, an unknown layout, an unset catalog source, or a refused URL.
    """
    models = ctx.models
    try:
        lora = models.private_lora(inputs.selectedLoraModelPrivateUrl, "selectedLoraModelPrivateUrl",
                                   "flux", ctx.input_file)
        if lora is None and inputs.selectedLoraModel:
            chosen = models.lora(inputs.selectedLoraModel, "selectedLoraModel", "flux-lora", inputs.scales)
            lora = checked_lora(chosen, "flux", "selectedLoraModel")
        base = models.base_checkpoint(TOOL.name, (FLUX.name,))
    except (ModelError, FetchError, LoraFormatError) as exc:
        raise ToolError(str(exc)) from None
    return flux_plan(TOOL.name, base, lora, inputs.prompt, inputs.samples, inputs.steps, inputs.scale, inputs.seed,
                     inputs.width, inputs.height, ctx.log)


def run(plan: FluxPlan, ctx: ToolContext) -> list[Path]:
    """:func:`easel.tools.common.run_flux`.

    Raises:
        ToolError: the LoRA does not fit the transformer.
        easel.tools.base.TaskKilled: (from ``ctx.progress``) when the task was killed.
    """
    return run_flux(plan, ctx)
