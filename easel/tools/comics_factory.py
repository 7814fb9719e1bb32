"""``Adel_AI/Comics-Factory-v1``: a *model* page, i.e. a preset over the FLUX.1 LoRA pipeline.

The tool catalog file (``easel/catalog/tools/Adel_AI__Comics-Factory-v1.json``) fixes the base
model (``base_model``) and the style LoRA with its scale (``preset``); the page exposes only
``prompt``, ``samples``, ``steps``, ``scale``, ``seed``, ``width`` and ``height``. Everything else,
pipeline, hot-swap slot, progress and outputs, is :mod:`easel.tools.flux_lora`'s: with the same
LoRA file, scale, prompt and seed the two tools give the same pixels.

The style's trigger phrase is ``ComicsFact1 style`` (catalog entry ``comics-factory-v1``); the
prompt is passed as written, as the seed's default prompt already starts with it. The LoRA's
weights are not public, so with ``--model-source hub`` the operator sets its source in the
catalog override file; with ``tiny`` it is a tiny PEFT-layout Flux LoRA.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from easel.catalog import load_tools
from easel.weights import ModelError

from . import flux_lora
from .base import ToolContext, ToolError

TOOL = "Adel_AI/Comics-Factory-v1"


def prepare(inputs: dict[str, Any], ctx: ToolContext) -> flux_lora.Plan:
    """Resolve the preset's LoRA and hand over to :func:`easel.tools.flux_lora.make_plan`.

    Raises:
        ToolError: the preset LoRA has no weights source configured, or is not a Flux LoRA.
    """
    preset = load_tools()[TOOL].preset
    try:
        c = ctx.models.lora(preset.get("lora", ""), f"style LoRA of {TOOL}", "flux-lora", {})
    except ModelError as exc:
        raise ToolError(str(exc)) from None
    lora = flux_lora.checked_lora(c.key, c.path, float(preset.get("scale", 1.0)), c.label, "preset LoRA")
    return flux_lora.make_plan(TOOL, inputs, lora, ctx)


def run(plan: flux_lora.Plan, ctx: ToolContext) -> list[Path]:
    """:func:`easel.tools.flux_lora.run` (same pipeline, same cache)."""
    return flux_lora.run(plan, ctx)
