"""Random-weight models at the published sizes of SD 1.5, SDXL and FLUX.1-dev.

Speed and memory do not depend on what the weights hold: a network of the published shape with
random weights does exactly the work of the real one. :func:`build_random` builds each family's
pipeline from configs written here (no hub access: layer counts and widths copied from the
families' published ``config.json`` files, tokenizers built offline as ``easel.synthetic.tiny``
does), directly on the target device and in the target dtype, so a 12-billion-parameter FLUX
transformer never passes through host memory in float32.

Sizes (``size``):

- ``"full"``: the published architecture. Parameters: SD 1.5 UNet 859.5 M, SDXL UNet 2.567 G,
  FLUX.1-dev transformer 11.9 G; text encoders CLIP ViT-L/14 (123 M), OpenCLIP ViT-bigG/14
  (695 M), T5-v1.1-XXL encoder (4.76 G); VAEs 83.7 M.
- ``"small"``: the same classes, block types and block counts with narrow layers (channels / 8 to
  / 16, fewer transformer layers), for CPU runs of the benchmark in CI and for the ``gpu`` tests.
  The code paths are the full-size ones; only the numbers shrink.

Sources of the published configs: ``runwayml/stable-diffusion-v1-5`` (``unet``, ``vae``,
``text_encoder``), ``stabilityai/stable-diffusion-xl-base-1.0`` (``unet``, ``text_encoder``,
``text_encoder_2``, ``vae``), ``black-forest-labs/FLUX.1-dev`` (``transformer``, ``text_encoder_2``,
``vae``, ``scheduler``).
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

SIZES = ("full", "small")
RANDOM_VERSION = 1

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
              is_gated_act=True, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
VAE_SD = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
              block_out_channels=(128, 256, 512, 512), norm_num_groups=32,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    norm_num_groups=32, cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    norm_num_groups=32, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def _small_clip(cfg: dict) -> dict:
    return {**cfg, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 2,
            "projection_dim": 64}


def component_configs(family: str, size: str = "full") -> dict[str, dict]:
    """Constructor keyword arguments of every network of ``family`` at ``size``.

    Returns:
        Component name (``unet``/``transformer``, ``vae``, ``text_encoder``, ``text_encoder_2``)
        → the keyword arguments of its diffusers / transformers class.

    Raises:
        ValueError: a family the tools do not declare with random weights
            (:func:`easel.tools.registry.random_families`), or an unknown size.
    """
    from easel.tools.registry import random_families

    families = random_families()
    if family not in families or size not in SIZES:
        raise ValueError(f"family must be one of {', '.join(families)} and size one of {', '.join(SIZES)}")
    small = size == "small"
    if family == "sd15":
        unet = dict(SD15_UNET)
        te = dict(CLIP_L)
        if small:
            unet.update(block_out_channels=(32, 64, 128, 128), cross_attention_dim=64, attention_head_dim=2)
            te = _small_clip(te)
        vae = {**VAE_SD, "sample_size": 512, "scaling_factor": 0.18215}
        if small:
            vae.update(block_out_channels=(16, 32, 64, 64), norm_num_groups=8, layers_per_block=1)
        return {"unet": unet, "vae": vae, "text_encoder": te}
    if family == "sdxl":
        unet = dict(SDXL_UNET)
        te, te2 = dict(CLIP_L), dict(CLIP_BIGG)
        if small:
            te, te2 = _small_clip(te), _small_clip(te2)
            # 64 + 64 text dims; the added time embeddings keep SDXL's six 256-d Fourier features
            unet.update(block_out_channels=(32, 64, 128), attention_head_dim=(1, 2, 4),
                        transformer_layers_per_block=(1, 1, 2), cross_attention_dim=128,
                        projection_class_embeddings_input_dim=64 + 6 * 256)
        vae = {**VAE_SD, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
        if small:
            vae.update(block_out_channels=(16, 32, 64, 64), norm_num_groups=8, layers_per_block=1)
        return {"unet": unet, "vae": vae, "text_encoder": te, "text_encoder_2": te2}
    if family != "flux":  # a family declared random whose architecture this module does not write
        raise ValueError(f"no random-weight architecture is written for the {family} family")
    transformer = dict(FLUX_DEV)
    te, t5 = dict(CLIP_L), dict(T5_XXL)
    if small:
        transformer.update(num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
                           joint_attention_dim=128, pooled_projection_dim=64, axes_dims_rope=(8, 12, 12))
        te = _small_clip(te)
        t5.update(d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4)
    vae = {**VAE_SD, "latent_channels": 16, "sample_size": 1024, "use_quant_conv": False, "use_post_quant_conv": False,
           "shift_factor": 0.1159, "scaling_factor": 0.3611}
    if small:
        vae.update(block_out_channels=(16, 32, 64, 64), norm_num_groups=8, layers_per_block=1)
    return {"transformer": transformer, "vae": vae, "text_encoder": te, "text_encoder_2": t5}


@contextlib.contextmanager
def _default_dtype(dtype):
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _build(cls, kwargs: dict, device, dtype):
    """Instantiate ``cls(**kwargs)`` with its parameters created on ``device`` in ``dtype``."""
    import torch

    with torch.device(device), _default_dtype(dtype):
        module = cls(**kwargs)
    if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
        module = module.to(dtype=dtype)
    return module.eval().requires_grad_(False)


def build_random(family: str, size: str = "full", device: str = "cpu", dtype: Any = None, seed: int = 0):
    """Build a random-weight pipeline of ``family`` at ``size`` on ``device``.

    Args:
        family: ``sd15`` (``StableDiffusionPipeline``), ``sdxl`` (``StableDiffusionXLPipeline``) or
            ``flux`` (``FluxPipeline``, FLUX.1-dev with guidance embedding).
        size: ``full`` (published sizes) or ``small`` (see the module docstring).
        device: torch device for the weights (``"cuda"``, ``"cuda:1"``, ``"cpu"``).
        dtype: torch dtype; default float32 on CPU, else the family's catalog dtype
            (:func:`easel.weights.precision.catalog_dtypes`: bfloat16 for FLUX, float16 otherwise).
            The SDXL VAE keeps ``force_upcast`` so diffusers decodes it in float32, as for the real one.
        seed: ``torch.manual_seed`` before the weights are drawn (reproducible weights per device).

    Returns:
        The pipeline, in eval mode, with no safety checker.

    Raises:
        ValueError: unknown family or size.
    """
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config,
                              T5EncoderModel)

    from easel.weights.precision import catalog_dtypes
    from easel.synthetic.tokenizers import write_clip_tokenizer, write_t5_tokenizer

    cfg = component_configs(family, size)
    if dtype is None:
        dtype = torch.float32 if str(device) == "cpu" else catalog_dtypes(family)[0]
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tok = write_clip_tokenizer(Path(tmp) / "clip")
        tok2 = write_t5_tokenizer(Path(tmp) / "t5") if family == "flux" else None
    ids = dict(bos_token_id=tok.convert_tokens_to_ids("<|startoftext|>"),
               eos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
               pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"))

    def clip(cls, kwargs):
        return _build(lambda **k: cls(CLIPTextConfig(**k)), {**kwargs, **ids}, device, dtype)

    vae = _build(AutoencoderKL, cfg["vae"], device, dtype)
    if family == "sd15":
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           steps_offset=1, timestep_spacing="leading")
        return StableDiffusionPipeline(
            unet=_build(UNet2DConditionModel, cfg["unet"], device, dtype), vae=vae,
            text_encoder=clip(CLIPTextModel, cfg["text_encoder"]), tokenizer=tok, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if family == "sdxl":
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           steps_offset=1, timestep_spacing="leading")
        return StableDiffusionXLPipeline(
            unet=_build(UNet2DConditionModel, cfg["unet"], device, dtype), vae=vae,
            text_encoder=clip(CLIPTextModel, cfg["text_encoder"]),
            text_encoder_2=clip(CLIPTextModelWithProjection, cfg["text_encoder_2"]),
            tokenizer=tok, tokenizer_2=tok, scheduler=scheduler)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    t5 = _build(lambda **k: T5EncoderModel(T5Config(**k)), cfg["text_encoder_2"], device, dtype)
    return FluxPipeline(
        transformer=_build(FluxTransformer2DModel, cfg["transformer"], device, dtype), vae=vae,
        text_encoder=clip(CLIPTextModel, cfg["text_encoder"]), tokenizer=tok, text_encoder_2=t5,
        tokenizer_2=tok2, scheduler=scheduler)


def parameter_counts(pipe) -> dict[str, int]:
    """Parameters per torch component of a pipeline (name → count)."""
    return {name: sum(p.numel() for p in comp.parameters())
            for name, comp in pipe.components.items() if hasattr(comp, "parameters")}


LORA_RANK = 16  # a common rank of published LoRAs (and within the FLUX hot-swap slot's 128)


def lora_paths(folder: Path, family: str) -> dict[str, Path]:
    """The random LoRA files :func:`make_random` writes next to a ``family`` pipeline folder
    (layout name → path): PEFT for every family, Kohya for SD 1.5 and FLUX."""
    layouts = ("peft",) if family == "sdxl" else ("peft", "kohya")
    return {layout: folder / f"lora-{layout}.safetensors" for layout in layouts}


def make_random(folder: str | Path, family: str, size: str = "full", device: str = "cpu", dtype: Any = None,
                force: bool = False) -> Path:
    """Write a random-weight ``family`` pipeline at ``size`` as a diffusers folder (safetensors),
    with random LoRAs of rank :data:`LORA_RANK` in the layouts of :func:`lora_paths`.

    The folder has the layout of the family's Hub repo, so ``from_pretrained`` loads it as it loads
    the real weights. Idempotent: an existing folder with the same version stamp is reused.

    Returns:
        The folder path ``<folder>/<family>-<size>``.
    """
    from easel.synthetic import tiny_loras

    target = Path(folder) / f"{family}-{size}"
    stamp = target / "easel-random.json"
    if not force and stamp.exists() and json.loads(stamp.read_text()).get("version") == RANDOM_VERSION:
        return target
    pipe = build_random(family, size, device=device, dtype=dtype)
    pipe.save_pretrained(str(target), safe_serialization=True)
    loras = lora_paths(target, family)
    if family == "flux":
        tiny_loras.write_flux_lora_peft(pipe, loras["peft"], rank=LORA_RANK)
        tiny_loras.write_flux_lora_kohya(pipe, loras["kohya"], rank=LORA_RANK)
    else:
        tiny_loras.write_lora_peft(pipe, loras["peft"], rank=LORA_RANK)
        if "kohya" in loras:
            tiny_loras.write_lora_kohya(pipe, loras["kohya"], rank=LORA_RANK)
    stamp.write_text(json.dumps({"version": RANDOM_VERSION, "family": family, "size": size,
                                 "parameters": parameter_counts(pipe), "note": "random weights: images are noise"}))
    return target
