"""Cheap live previews: the current latent projected to RGB by a fixed linear map, as a small JPEG.

Each latent channel contributes a fixed RGB colour (``rgb = latent · F + b``); no VAE runs, so a
preview costs one tiny matrix product and a JPEG encode of at most ``max_side`` pixels per side
(about a millisecond), and it can be taken every few steps without slowing denoising measurably
(``bench/bench_previews.py``). The per-channel factors are the well-known approximations fitted
for each VAE (the values ComfyUI uses for its "latent2rgb" previews): SD 1.x (4 channels) and
FLUX.1 (16 channels), declared with each model family (``easel.tools.common``).
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch


def factors(family: str) -> tuple[list[list[float]], list[float]]:
    """``(factors, bias)`` of ``family``'s VAE, from the tools' family declarations
    (``easel.tools.base.Family.preview``).

    Raises:
        KeyError: a family without declared preview factors.
    """
    from .registry import families

    declared = families().get(family)
    if declared is None or declared.preview is None:
        raise KeyError(family)
    return [list(row) for row in declared.preview.factors], list(declared.preview.bias)


def latent_to_jpeg(latent: torch.Tensor, family: str, max_side: int = 128, quality: int = 70) -> bytes:
    """Approximate RGB of one latent, as JPEG bytes.

    Args:
        latent: Tensor ``[C, h, w]`` (any float dtype, any device) with ``C`` the family's latent
            channels (4 for ``sd15``, 16 for ``flux`` unpacked), in the scaled space the denoiser
            works in.
        family: a family that declares preview factors (``easel.tools.base.Family.preview``).
        max_side: The longer side of the JPEG in pixels (the latent is 1/8 of the image, so a
            64×64 latent gives a 64×64 preview; larger latents are downscaled).

    Raises:
        KeyError: a family without preview factors. ValueError: channel count does not match the family.
    """
    import torch
    from PIL import Image

    rows, bias = factors(family)
    lat = latent.detach().to("cpu", torch.float32)
    if lat.shape[0] != len(rows):
        raise ValueError(f"{family} previews need {len(rows)} latent channels, got {lat.shape[0]}")
    rgb = torch.einsum("chw,cr->hwr", lat, torch.tensor(rows)) + torch.tensor(bias)
    rgb = ((rgb.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).numpy()
    image = Image.fromarray(rgb, "RGB")
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()
