"""Reading a Stable Diffusion checkpoint (SD 1.5 or SDXL; a diffusers folder or a single file)
into a diffusers pipeline on the CPU: shared by the tools and IC-Light's pipeline (which builds
its own modules from the same weights)."""
from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from easel.weights import Weights

P = TypeVar("P")


def read_checkpoint(pipeline_class: "type[P]", weights: "Weights", dtype: "torch.dtype", **kwargs: object) -> P:
    """Read ``pipeline_class`` (a diffusers pipeline class) in ``dtype`` from local weights: a
    diffusers folder (``from_pretrained``, safetensors) or a single-file checkpoint
    (``from_single_file``, with the weights' ``config`` folder when known), on the CPU, progress
    bar off, with the extra ``kwargs``. Every call builds new modules."""
    from easel.weights import dtype_kwargs

    options = dict(**dtype_kwargs(dtype), **kwargs)
    if weights.format == "diffusers":
        pipe = pipeline_class.from_pretrained(str(weights.path), use_safetensors=True, **options)
    else:
        if weights.config is not None:
            options["config"] = str(weights.config)
        pipe = pipeline_class.from_single_file(str(weights.path), **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read_pipeline(weights: "Weights", dtype: "torch.dtype") -> "StableDiffusionPipeline":
    """A ``StableDiffusionPipeline`` (SD 1.5) without safety checker, as :func:`read_checkpoint`."""
    from diffusers import StableDiffusionPipeline

    return read_checkpoint(StableDiffusionPipeline, weights, dtype, safety_checker=None,
                           requires_safety_checker=False)


def read_sdxl(weights: "Weights", dtype: "torch.dtype") -> "StableDiffusionXLPipeline":
    """A ``StableDiffusionXLPipeline`` without watermarker, as :func:`read_checkpoint`."""
    from diffusers import StableDiffusionXLPipeline

    return read_checkpoint(StableDiffusionXLPipeline, weights, dtype, add_watermarker=False)
