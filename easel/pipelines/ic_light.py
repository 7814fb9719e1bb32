"""IC-Light ("fbc": foreground + background conditioned) as diffusers does not ship it: the
reference procedure of lllyasviel/IC-Light (``gradio_demo_bg.py``), re-implemented. The IC-Light
tool documents the procedure step by step and calls :func:`load_iclight` and :func:`process`;
``bench/bench_iclight.py`` calls :func:`process` directly.

No attribute is patched onto diffusers objects: what a UNet holds (the merged offset, the concat
hook) and each pipeline's image-to-image twin are kept in a :class:`easel.weights.cache.StateTable`
beside them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from easel.weights.cache import StateTable
from easel.weights.precision import cast, generators, precision

if TYPE_CHECKING:  # pragma: no cover
    from easel.weights import Precision, Weights

UPLOAD, UPLOAD_FLIP = "Use Background Image", "Use Flipped Background Image"
LEFT, RIGHT, TOP, BOTTOM, GREY = "Left Light", "Right Light", "Top Light", "Bottom Light", "Ambient"
BG_SOURCES = (UPLOAD, UPLOAD_FLIP, LEFT, RIGHT, TOP, BOTTOM, GREY)
ADDED_PROMPT = "best quality"
MIN_SIDE, MAX_SIDE = 256, 1024  # the reference's size sliders
PHASES = ("Matting", "Low-res pass", "High-res pass")
PRECISION_KIND = "ic-light"  # easel.weights.precision kind of the UNet, text encoder and VAE


@dataclass
class UNetPatch:
    """What IC-Light did to a UNet: the offset merged into it (its label; "" for none) and
    whether the concat hook is installed."""

    offset: str = ""
    hooked: bool = False


@dataclass
class Img2Img:
    """A pipeline's image-to-image twin over the same modules (made once)."""

    pipe: Any = None


_STATE = StateTable()


def highres_steps(steps: int, denoise: float) -> tuple[int, int]:
    """IC-Light's high-res pass: ``(scheduled, run)``. The reference schedules
    ``round(steps / denoise)`` image-to-image steps, and diffusers' img2img runs the last
    ``min(int(scheduled · denoise), scheduled)`` of them (``get_timesteps``)."""
    scheduled = int(round(steps / denoise))
    return scheduled, min(int(scheduled * denoise), scheduled)


# -- sizes -------------------------------------------------------------------------------------

def lowres_size(width: int, height: int, min_side: int = MIN_SIDE, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """The low-res pass's size for a foreground of ``width × height`` pixels.

    The reference (``gradio_demo_bg.py``) generates at its width/height sliders: 256 to 1024 in
    steps of 64, default 512 × 640. Wiro's page has no size inputs, so Easel takes the
    foreground's own size and fits it into that range keeping its aspect: scaled down so the
    longer side is at most ``max_side``, or up so the shorter side is at least ``min_side``
    (when both cannot hold, as for a panorama beyond 4:1, the longer side wins and the shorter is
    raised to ``min_side``: the cover-crop of the conditioning then trims it), each side rounded
    to the nearest multiple of 64 and clamped to ``[min_side, max_side]``.

    Examples: 512 × 640 → 512 × 640; 64 × 96 → 256 × 384; 3000 × 2000 → 1024 × 704;
    100 × 1000 → 256 × 1024.
    """
    short, long = min(width, height), max(width, height)
    s = min(1.0, max_side / long)
    if short * s < min_side:
        s = min(min_side / short, max_side / long)

    def side(v: int) -> int:
        return min(max_side, max(min_side, int(round(v * s / 64.0)) * 64))

    return side(width), side(height)


def highres_size(width: int, height: int, highres_scale: float) -> tuple[int, int]:
    """The high-res pass's (= the output's) size: ``size · highres_scale`` rounded to multiples of 64."""
    return int(round(width * highres_scale / 64.0) * 64), int(round(height * highres_scale / 64.0) * 64)


# -- the model ---------------------------------------------------------------------------------

def widen_conv_in(unet: Any, in_channels: int = 12) -> None:
    """Replace ``unet.conv_in`` by a conv with ``in_channels`` inputs: the old weights in the
    first channels, zeros in the new ones, the same bias (the same ``Parameter`` object). The
    config's ``in_channels`` stays 4 (the pipeline still makes 4-channel latents)."""
    import torch

    old = unet.conv_in
    if old.in_channels == in_channels:
        return
    with torch.no_grad():
        new = torch.nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                              device=old.weight.device, dtype=old.weight.dtype)
        new.weight.zero_()
        new.weight[:, :old.in_channels].copy_(old.weight)
        new.bias = old.bias
    unet.conv_in = new


def merge_offset(unet: Any, offset: dict, label: str) -> None:
    """Add an IC-Light offset to the (widened) UNet's weights: ``w ← w + offset[k]`` for every key.

    Raises:
        ValueError: the UNet already holds an offset (it is never merged twice), or the offset's
            keys or shapes do not match this UNet (another architecture).
    """
    patch = _STATE.get(unet, UNetPatch)
    if patch.offset:
        raise ValueError(f"UNet already holds the offset {patch.offset}; an offset is never merged twice")
    state = unet.state_dict()
    missing = [k for k in state if k not in offset]
    unexpected = [k for k in offset if k not in state]
    if missing or unexpected:
        raise ValueError(f"IC-Light offset {label} does not match this UNet (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}): it was made for another model family")
    bad = [k for k in state if tuple(state[k].shape) != tuple(offset[k].shape)]
    if bad:
        raise ValueError(f"IC-Light offset {label} has other shapes than this UNet (e.g. {bad[0]}: "
                         f"{tuple(offset[bad[0]].shape)} vs {tuple(state[bad[0]].shape)})")
    merged = {k: state[k] + offset[k].to(state[k].dtype) for k in state}
    unet.load_state_dict(merged, strict=True)
    patch.offset = label


def _concat_hook(_module, args, kwargs):
    extra = kwargs.get("cross_attention_kwargs") or {}
    if "concat_conds" not in extra:
        return None
    import torch

    sample = args[0] if args else kwargs.pop("sample")
    cond = extra["concat_conds"].to(sample)
    cond = torch.cat([cond] * (sample.shape[0] // cond.shape[0]), dim=0)
    kwargs = {**kwargs, "cross_attention_kwargs": {k: v for k, v in extra.items() if k != "concat_conds"}}
    return (torch.cat([sample, cond], dim=1), *args[1:]), kwargs


def install_concat_hook(unet: Any) -> None:
    """Concat conditioning: a forward pre-hook that, when the call's ``cross_attention_kwargs``
    carries ``concat_conds`` ``[B', 8, h, w]``, repeats it to the sample's batch (CFG doubles it)
    and concatenates it to the sample's channels. Only this (derived) UNet gets the hook."""
    patch = _STATE.get(unet, UNetPatch)
    if not patch.hooked:
        unet.register_forward_pre_hook(_concat_hook, with_kwargs=True)
        patch.hooked = True


def make_scheduler():
    """The reference's sampler: DPM++ 2M SDE with Karras sigmas."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, steps_offset=1)


def load_iclight(base: "Weights", offset_path: str | Path, offset_label: str = "fbc",
                 where: "Precision | None" = None) -> Any:
    """Build the IC-Light text-to-image pipeline from base SD 1.5 weights and an fbc offset file.

    Loads its **own** modules (never the SD tool's pipeline), in float32 for the merge, then
    widens ``conv_in``, merges the offset, installs the concat hook, and moves UNet and text
    encoder to ``where.device`` in ``where.dtype``, the VAE in ``where.vae_dtype`` (default
    ``precision("ic-light")``: float16 / bfloat16 on CUDA as the reference, float32 on the CPU).

    Returns:
        A ``StableDiffusionPipeline`` with the reference's scheduler; :func:`img2img` makes the
        matching image-to-image pipeline over the same modules.

    Raises:
        ValueError: the offset does not fit the base UNet.
    """
    import torch
    from safetensors.torch import load_file

    from easel.pipelines.checkpoints import read_pipeline

    pipe = read_pipeline(base, torch.float32)
    widen_conv_in(pipe.unet)
    merge_offset(pipe.unet, load_file(str(offset_path)), offset_label)
    install_concat_hook(pipe.unet)
    pipe.scheduler = make_scheduler()
    where = where or precision(PRECISION_KIND)
    cast(pipe.text_encoder, where.dtype, where.device)
    cast(pipe.unet, where.dtype, where.device)
    cast(pipe.vae, where.vae_dtype, where.device)
    return pipe


def img2img(pipe: Any) -> Any:
    """The image-to-image pipeline over ``pipe``'s modules and scheduler (made once, kept on ``pipe``)."""
    twin = _STATE.get(pipe, Img2Img)
    if twin.pipe is None:
        from diffusers import StableDiffusionImg2ImgPipeline

        twin.pipe = StableDiffusionImg2ImgPipeline(
            vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
            scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        twin.pipe.set_progress_bar_config(disable=True)
    return twin.pipe


# -- image helpers (numpy uint8 HxWx3, as the reference) ----------------------------------------

def to_tensor(images: list[np.ndarray]):
    """uint8 ``[H, W, 3]`` images → float ``[B, 3, H, W]`` with ``x / 127 - 1`` (127 maps exactly to 0)."""
    import torch

    return (torch.from_numpy(np.stack(images, axis=0)).float() / 127.0 - 1.0).movedim(-1, 1)


def to_uint8(images) -> list[np.ndarray]:
    """``[B, 3, H, W]`` in ``[-1, 1]`` → uint8 ``[H, W, 3]`` (``x · 127.5 + 127.5``, clipped, truncated)."""
    return [(x.movedim(0, -1) * 127.5 + 127.5).detach().float().cpu().numpy().clip(0, 255).astype(np.uint8)
            for x in images]


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Lanczos resize to exactly ``width × height``."""
    from PIL import Image

    return np.array(Image.fromarray(image).resize((width, height), Image.LANCZOS))


def cover_crop(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Lanczos resize to cover ``width × height``, then centre crop to it."""
    from PIL import Image

    pil = Image.fromarray(image)
    w0, h0 = pil.size
    s = max(width / w0, height / h0)
    rw, rh = int(round(w0 * s)), int(round(h0 * s))
    pil = pil.resize((rw, rh), Image.LANCZOS)
    box = ((rw - width) / 2, (rh - height) / 2, (rw + width) / 2, (rh + height) / 2)
    return np.array(pil.crop(box))


def matte(rmbg: Any, image: np.ndarray, sigma: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Cut out the foreground with RMBG and composite it on grey.

    Args:
        rmbg: :class:`easel.pipelines.rmbg.BriaRMBG` (float32, kind ``matting``; fed in its own dtype).
        image: uint8 ``[H, W, 3]``.

    Returns:
        ``(composited uint8 [H, W, 3], alpha float32 [H, W, 1] in [0, 1])``.
    """
    import torch

    h, w, _ = image.shape
    k = (256.0 / float(h * w)) ** 0.5
    feed = resize(image, max(64, int(64 * round(w * k))), max(64, int(64 * round(h * k))))
    param = next(rmbg.parameters())
    with torch.inference_mode():
        alpha = rmbg(to_tensor([feed]).to(device=param.device, dtype=param.dtype))
        alpha = torch.nn.functional.interpolate(alpha, size=(h, w), mode="bilinear")
    alpha = alpha.movedim(1, -1)[0].float().cpu().numpy().clip(0, 1)
    out = 127 + (image.astype(np.float32) - 127 + sigma) * alpha
    return out.clip(0, 255).astype(np.uint8), alpha


def background(source: str, bg: np.ndarray, width: int, height: int) -> np.ndarray:
    """The background image for ``source`` (see :data:`BG_SOURCES`), uint8 ``[H, W, 3]``."""
    if source == UPLOAD:
        return bg
    if source == UPLOAD_FLIP:
        return np.ascontiguousarray(np.fliplr(bg))
    if source == GREY:
        return np.zeros((height, width, 3), dtype=np.uint8) + 64
    if source in (LEFT, RIGHT):
        ramp = np.linspace(224, 32, width) if source == LEFT else np.linspace(32, 224, width)
        plane = np.tile(ramp, (height, 1))
    elif source in (TOP, BOTTOM):
        ramp = np.linspace(224, 32, height) if source == TOP else np.linspace(32, 224, height)
        plane = np.tile(ramp[:, None], (1, width))
    else:
        raise ValueError(f"bg_source must be one of {', '.join(BG_SOURCES)}")
    return np.stack((plane,) * 3, axis=-1).astype(np.uint8)


def encode_prompt(pipe: Any, text: str):
    """CLIP embeddings of ``text`` in chunks of 75 tokens (each wrapped in BOS/EOS and padded with
    EOS to 77), ``[chunks, 77, hidden]``; an empty text is one empty chunk. A text with A1111
    weights goes through :func:`easel.pipelines.prompts.encode_iclight` (same chunks, weighted)."""
    import torch

    from easel.pipelines.prompts import encode_iclight, has_weights

    if has_weights(text):  # (word:1.2), [word]: A1111 weights in the reference's chunks
        return encode_iclight(pipe, text)
    tok = pipe.tokenizer
    size, body = tok.model_max_length, tok.model_max_length - 2
    ids = tok(text, truncation=False, add_special_tokens=False)["input_ids"]
    chunks = [[tok.bos_token_id] + ids[i:i + body] + [tok.eos_token_id] for i in range(0, max(len(ids), 1), body)]
    chunks = [c[:size] + [tok.eos_token_id] * (size - len(c)) for c in chunks]
    with torch.inference_mode():
        return pipe.text_encoder(torch.tensor(chunks, device=pipe.text_encoder.device)).last_hidden_state


def encode_prompt_pair(pipe: Any, positive: str, negative: str):
    """Positive and negative embeddings with the same number of chunks (the shorter one repeated),
    chunks concatenated along the sequence: two ``[1, 77 · n, hidden]`` tensors."""
    import torch

    c, uc = encode_prompt(pipe, positive), encode_prompt(pipe, negative)
    n = max(len(c), len(uc))
    c = torch.cat([c] * math.ceil(n / len(c)), dim=0)[:n]
    uc = torch.cat([uc] * math.ceil(n / len(uc)), dim=0)[:n]
    return torch.cat(list(c), dim=0)[None], torch.cat(list(uc), dim=0)[None]


def _concat_conds(pipe: Any, fg: np.ndarray, bg: np.ndarray, width: int, height: int):
    import torch

    vae = pipe.vae
    pair = [cover_crop(fg, width, height), cover_crop(bg, width, height)]
    with torch.inference_mode():
        latents = vae.encode(to_tensor(pair).to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
        latents = latents * vae.config.scaling_factor
    return torch.cat([c[None] for c in latents], dim=1)


def relight(pipe: Any, fg: np.ndarray, bg: np.ndarray, prompt: str, negative_prompt: str, width: int, height: int,
            samples: int, seed: int, steps: int, cfg: float, highres_scale: float, highres_denoise: float,
            on_step: Callable[[str, Any], None] | None = None) -> list[np.ndarray]:
    """Both denoising passes (reference ``process``) on a matted foreground and a background.

    Args:
        pipe: From :func:`load_iclight`.
        fg, bg: uint8 ``[H, W, 3]`` (fg already matted on grey; bg as it will be used).
        width, height: The low-res pass's size (multiples of 64).
        on_step: Called after each denoising step with the phase name and the current latents.

    Returns:
        ``samples`` uint8 images ``[H', W', 3]`` at :func:`highres_size`.
    """
    import torch

    device = pipe.unet.device
    rng = generators(seed)[0]
    conds, unconds = encode_prompt_pair(pipe, f"{prompt}, {ADDED_PROMPT}", negative_prompt)
    vae = pipe.vae

    def callback(phase):
        def fn(_pipe, _step, _t, kw):
            if on_step is not None:
                on_step(phase, kw["latents"])
            return kw
        return fn

    with torch.inference_mode():
        concat = _concat_conds(pipe, fg, bg, width, height)
        latents = pipe(prompt_embeds=conds, negative_prompt_embeds=unconds, width=width, height=height,
                       num_inference_steps=steps, num_images_per_prompt=samples, generator=rng, output_type="latent",
                       guidance_scale=cfg, cross_attention_kwargs={"concat_conds": concat},
                       callback_on_step_end=callback(PHASES[1])).images
        pixels = to_uint8(vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample)
        hw, hh = highres_size(width, height, highres_scale)
        pixels = [resize(p, hw, hh) for p in pixels]
        latents = vae.encode(to_tensor(pixels).to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
        latents = (latents * vae.config.scaling_factor).to(device=device, dtype=pipe.unet.dtype)
        height, width = latents.shape[2] * 8, latents.shape[3] * 8
        concat = _concat_conds(pipe, fg, bg, width, height)
        scheduled, _ = highres_steps(steps, highres_denoise)
        latents = img2img(pipe)(
            image=latents, strength=highres_denoise, prompt_embeds=conds, negative_prompt_embeds=unconds,
            width=width, height=height, num_inference_steps=scheduled, num_images_per_prompt=samples,
            generator=rng, output_type="latent", guidance_scale=cfg, cross_attention_kwargs={"concat_conds": concat},
            callback_on_step_end=callback(PHASES[2])).images
        out = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    unit = [(x.movedim(0, -1) * 0.5 + 0.5).float().cpu().numpy().clip(0, 1) for x in out]
    return [(x * 255.0).clip(0, 255).astype(np.uint8) for x in unit]


def process(pipe: Any, rmbg: Any, fg_image, bg_image, bg_source: str, prompt: str, negative_prompt: str,
            samples: int, seed: int, steps: int, cfg: float, highres_scale: float, highres_denoise: float,
            on_step: Callable[[str, Any], None] | None = None,
            size: tuple[int, int] | None = None) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """The whole procedure (reference ``process_relight``) on PIL images: matting, background,
    both passes. Used by :func:`run` and by ``bench/bench_iclight.py`` as the direct call.

    Args:
        size: ``(width, height)`` of the low-res pass (the reference's size sliders); default
            :func:`lowres_size` of the foreground.

    Returns:
        ``(results, intermediates)``: uint8 images at the final size, and ``foreground`` (matted on
        grey), ``alpha`` (uint8 matte) and ``background`` (as used).
    """
    width, height = size or lowres_size(*fg_image.size)
    fg, alpha = matte(rmbg, np.array(fg_image.convert("RGB")))
    if on_step is not None:
        on_step(PHASES[0], None)
    bg = background(bg_source, np.array(bg_image.convert("RGB")), width, height)
    results = relight(pipe, fg, bg, prompt, negative_prompt, width, height, samples, seed, steps, cfg,
                      highres_scale, highres_denoise, on_step)
    return results, {"foreground": fg, "alpha": (alpha[..., 0] * 255.0).clip(0, 255).astype(np.uint8),
                     "background": bg}
