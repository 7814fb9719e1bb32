"""Cheap live previews: the current latent projected to RGB by a fixed linear map, as a small JPEG.

Each latent channel contributes a fixed RGB colour (``rgb = latent · F + b``); no VAE runs, so a
preview costs one tiny matrix product and a JPEG encode of at most ``max_side`` pixels per side
(about a millisecond), and it can be taken every few steps without slowing denoising measurably
(``bench/bench_previews.py``). The per-channel factors are the well-known approximations fitted
for each VAE (the values ComfyUI uses for its "latent2rgb" previews): SD 1.x (4 channels) and
FLUX.1 (16 channels).
"""
from __future__ import annotations

import io
from typing import Any

SD15_FACTORS = [
    [0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177],
]
SD15_BIAS = [0.0, 0.0, 0.0]
FLUX_FACTORS = [
    [-0.0346, 0.0244, 0.0681], [0.0034, 0.0210, 0.0687], [0.0275, -0.0668, -0.0433], [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329], [0.0004, 0.0383, 0.0115], [0.0405, 0.0861, 0.0915], [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180], [0.1008, 0.0755, -0.0421], [-0.0515, 0.0201, 0.0011], [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749], [-0.1264, -0.0522, -0.1103], [-0.0280, -0.0881, -0.0499], [-0.1262, -0.0982, -0.0778],
]
FLUX_BIAS = [-0.0329, -0.0718, -0.0851]
FACTORS = {"sd15": (SD15_FACTORS, SD15_BIAS), "flux": (FLUX_FACTORS, FLUX_BIAS)}


def latent_to_jpeg(latent: Any, family: str, max_side: int = 128, quality: int = 70) -> bytes:
    """Approximate RGB of one latent, as JPEG bytes.

    Args:
        latent: Tensor ``[C, h, w]`` (any float dtype, any device) with ``C`` = 4 for ``sd15`` or
            16 for ``flux`` (unpacked), in the scaled space the denoiser works in.
        family: ``sd15`` or ``flux``.
        max_side: The longer side of the JPEG in pixels (the latent is 1/8 of the image, so a
            64×64 latent gives a 64×64 preview; larger latents are downscaled).

    Raises:
        KeyError: unknown family. ValueError: channel count does not match the family.
    """
    import torch
    from PIL import Image

    factors, bias = FACTORS[family]
    lat = latent.detach().to("cpu", torch.float32)
    if lat.shape[0] != len(factors):
        raise ValueError(f"{family} previews need {len(factors)} latent channels, got {lat.shape[0]}")
    rgb = torch.einsum("chw,cr->hwr", lat, torch.tensor(factors)) + torch.tensor(bias)
    rgb = ((rgb.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).numpy()
    image = Image.fromarray(rgb, "RGB")
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()
