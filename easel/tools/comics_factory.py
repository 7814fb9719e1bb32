"""``Adel_AI/Comics-Factory-v1``: a *model* page, i.e. a preset over the FLUX.1 LoRA pipeline.

The tool catalog file (``easel/catalog/tools/Adel_AI__Comics-Factory-v1.json``) fixes the base
model (``base_model``) and the style LoRA with its scale (``preset``); the page exposes only
``prompt``, ``samples``, ``steps``, ``scale``, ``seed``, ``width`` and ``height``. Everything else,
pipeline, hot-swap slot, progress and outputs, is the FLUX tools' shared
:func:`easel.tools.common.run_flux`: with the same LoRA file, scale, prompt and seed as the FLUX
LoRA tool it gives the same pixels.

The style's trigger phrase is ``ComicsFact1 style`` (catalog entry ``comics-factory-v1``); the
prompt is passed as written, as the seed's default prompt already starts with it. The LoRA's
weights are not public, so with ``--model-source hub`` the operator sets its source in the
catalog override file; with ``tiny`` it is a tiny PEFT-layout Flux LoRA.
"""
from __future__ import annotations

from pathlib import Path

from easel.catalog import load_tools
from easel.weights import ModelError

from .base import ToolContext, ToolDeclaration, ToolError, ToolInputs
from .common import FLUX, FluxPlan, checked_lora, flux_plan, run_flux


class Inputs(ToolInputs):
    """The page's inputs, as its catalog file declares them (checked when registered)."""

    prompt: str = ""
    samples: int = 1
    steps: int = 20
    scale: float = 3.5
    seed: str = ""
    width: int = 1024
    height: int = 1024


TOOL = ToolDeclaration(
    name="Adel_AI/Comics-Factory-v1",
    catalog=Path(__file__).parents[1] / "catalog" / "tools" / "Adel_AI__Comics-Factory-v1.json",
    inputs=Inputs,
    family=FLUX,
)


def prepare(inputs: Inputs, ctx: ToolContext) -> FluxPlan:
    """Resolve the base model and the preset's LoRA at the preset's scale.

    Raises:
        ToolError: the preset LoRA has no weights source configured, or is not a Flux LoRA.
    """
    preset = load_tools()[TOOL.name].preset
    try:
        chosen = ctx.models.lora(str(preset.get("lora", "")), f"style LoRA of {TOOL.name}", "flux-lora", {})
        base = ctx.models.base_checkpoint(TOOL.name, (FLUX.name,))
    except ModelError as exc:
        raise ToolError(str(exc)) from None
    lora = checked_lora(chosen, "flux", "preset LoRA", scale=float(preset.get("scale", 1.0)))
    return flux_plan(TOOL.name, base, lora, inputs.prompt, inputs.samples, inputs.steps, inputs.scale, inputs.seed,
                     inputs.width, inputs.height, ctx.log)


def run(plan: FluxPlan, ctx: ToolContext) -> list[Path]:
    """:func:`easel.tools.common.run_flux` (the same pipeline and cache as the other FLUX tools)."""
    return run_flux(plan, ctx)
