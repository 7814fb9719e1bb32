"""Tiny random-weight models written in the exact on-disk formats real weights use.

``make_tiny(dir)`` writes, deterministically (fixed seeds):

- ``sd15/``: a diffusers pipeline folder (``model_index.json``, ``unet/``, ``vae/``,
  ``text_encoder/``, ``tokenizer/``, ``scheduler/``; weights as ``.safetensors``), the layout of
  e.g. ``CompVis/stable-diffusion-v1-4`` on the Hub.
- ``sd15-single-file.safetensors``: the same weights as one original-LDM-layout checkpoint
  (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``), the
  format of community checkpoints, loadable with ``from_single_file(..., config=<sd15 folder>)``.
- ``sd15-lora-peft.safetensors``: a LoRA in the diffusers/PEFT layout
  (``unet.<module>.lora_A.weight``), as written by ``save_lora_weights``.
- ``sd15-lora-kohya.safetensors``: a LoRA in the Kohya layout
  (``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``), the usual format of
  community LoRAs.
- ``flux/``: a FLUX.1-dev-shaped diffusers folder (``transformer/`` a ``FluxTransformer2DModel``
  with guidance embedding, ``vae/`` a 16-channel ``AutoencoderKL`` without quant convs,
  ``text_encoder/`` CLIP + ``tokenizer/``, ``text_encoder_2/`` T5 encoder + ``tokenizer_2/`` (a
  SentencePiece-style unigram vocabulary built offline), ``scheduler/`` flow-matching Euler with
  dynamic shifting), the layout of ``black-forest-labs/FLUX.1-dev``.
- ``flux-lora-peft.safetensors`` (``transformer.<module>.lora_A.weight``, as diffusers and
  ai-toolkit write), ``flux-lora-kohya.safetensors`` (BFL module names in Kohya form:
  ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``, fused qkv) and
  ``flux-lora-xlabs.safetensors`` (``double_blocks.0.processor.qkv_lora1.down.weight``) and
  ``flux-lora-bfl.safetensors`` (``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``):
  the four layouts Flux LoRAs are commonly published in.
- ``iclight-fbc.safetensors``: an IC-Light "fbc" offset for the tiny SD 1.5 UNet, in the layout of
  ``lllyasviel/ic-light``'s ``iclight_sd15_fbc.safetensors`` (every diffusers UNet key, with
  ``conv_in.weight`` widened to 12 input channels; small random values).
- ``rmbg.safetensors``: a tiny RMBG-1.4 matting network (``easel.pipelines.rmbg``, channels / 16) with
  the checkpoint's parameter names.

Size and speed: the UNet keeps SD 1.5's classes and four resolution levels (so the VAE scale
factor is 8 and a 512² image denoises a 64² latent) but has 32–64 channels, **one attention
head**, and attention only at the 32² and 16² levels. The original slowness of tiny SD models at
512² came from SD's legacy ``attention_head_dim=8`` meaning *eight heads*: with 32 channels that
is head_dim 4, and CPU flash attention's cost then scales with batch × heads × tokens² with almost
no work per head (7.7 s per UNet call at batch 8 here, against 0.3 s with this design; see
docs/benchmarks.md). The images are noise: these models exist to run the real code paths offline.
"""
from __future__ import annotations

import json
from pathlib import Path

from easel.synthetic.ldm_layout import text_encoder_to_ldm, unet_to_ldm, vae_to_ldm
from easel.synthetic.tiny_loras import (write_flux_lora_bfl, write_flux_lora_kohya, write_flux_lora_peft,
                                        write_flux_lora_xlabs, write_lora_kohya, write_lora_peft)
from easel.synthetic.tokenizers import write_clip_tokenizer, write_t5_tokenizer

TINY_VERSION = 8
_SEED = 0


def build_sd15_pipeline():
    """Build the tiny SD 1.5 pipeline in memory (fixed seed). Returns a ``StableDiffusionPipeline``."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    import tempfile

    torch.manual_seed(_SEED)
    with tempfile.TemporaryDirectory() as tmp:
        tok = write_clip_tokenizer(Path(tmp))
    vocab_size = len(tok)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=12,
        num_attention_heads=1, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tok.convert_tokens_to_ids("<|startoftext|>"), eos_token_id=eos, pad_token_id=eos,
    ))
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 32, 64, 64), norm_num_groups=32, cross_attention_dim=32,
        attention_head_dim=1,  # legacy name: this is the number of heads
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=1,
        block_out_channels=(8, 16, 32, 32), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading",
    )
    for module in (text_encoder, unet, vae):
        module.eval()
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tok, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )



def write_single_file(pipe, path: Path) -> None:
    """Save ``pipe``'s UNet, VAE and text encoder as one original-LDM-layout ``.safetensors``."""
    from safetensors.torch import save_file

    sd = {}
    sd.update(unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config)))
    sd.update(vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)))
    sd.update(text_encoder_to_ldm(pipe.text_encoder.state_dict()))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))



def build_flux_pipeline():
    """Build the tiny FLUX.1-dev pipeline in memory (fixed seed). Returns a ``FluxPipeline``.

    Shapes follow FLUX.1-dev scaled down: 16 latent channels packed 2×2 (``in_channels=64``), one
    double-stream and one single-stream block, 2 heads of 16 (RoPE axes 4+6+6), guidance
    embedding on (dev is guidance-distilled), CLIP pooled 32-d and T5 32-d context.
    """
    import tempfile

    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(_SEED + 1)
    with tempfile.TemporaryDirectory() as tmp:
        tok = write_clip_tokenizer(Path(tmp) / "clip")
        tok2 = write_t5_tokenizer(Path(tmp) / "t5")
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=77, projection_dim=32, bos_token_id=tok.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=eos, pad_token_id=eos,
    ))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tok2), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1,
    ))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, sample_size=512, layers_per_block=1,
        block_out_channels=(8, 16, 32, 32), norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.1159, scaling_factor=0.3611,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    for module in (text_encoder, text_encoder_2, transformer, vae):
        module.eval()
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                        text_encoder_2=text_encoder_2, tokenizer_2=tok2, transformer=transformer)



def write_iclight_offset(pipe, path: Path, seed: int = 31, scale: float = 0.02) -> None:
    """Write an IC-Light fbc-layout offset for ``pipe``'s UNet: the UNet's own keys and shapes, except
    ``conv_in.weight`` with 12 input channels (4 noisy-latent + 4 foreground + 4 background);
    values ``scale · N(0, 1)`` (``scale=0`` writes the all-zero offset)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, value in pipe.unet.state_dict().items():
        shape = list(value.shape)
        if key == "conv_in.weight":
            shape[1] = 12
        sd[key] = (torch.randn(shape, generator=g) * scale).to(value.dtype).contiguous()
    save_file(sd, str(path))


def make_tiny(folder: str | Path, force: bool = False) -> dict[str, Path]:
    """Write every tiny model into ``folder`` (idempotent unless ``force``).

    Returns:
        Name → path: ``sd15`` (folder), ``sd15-single-file``, ``sd15-lora-peft``, ``sd15-lora-kohya``,
        ``flux`` (folder), ``flux-lora-peft``, ``flux-lora-kohya``, ``flux-lora-xlabs``, ``flux-lora-bfl``,
        ``iclight-fbc``, ``rmbg``, and the SDXL family of ``easel.synthetic.tiny_sdxl`` (``sdxl``,
        ``sdxl-single-file``, ``sdxl-lora-kohya``, ``sdxl-lora-peft``,
        ``sdxl-controlnet-{identitynet,openpose,depth,canny}``, ``instantid-ip-adapter`` (``.bin``),
        ``instantid-ip-adapter-safetensors``, ``depth-dpt``, ``faces`` (insightface root)).
    """
    from easel.synthetic.tiny_sdxl import paths as sdxl_family_paths, write_all as write_sdxl_family

    folder = Path(folder)
    paths = {
        "sd15": folder / "sd15",
        "sd15-single-file": folder / "sd15-single-file.safetensors",
        "sd15-lora-peft": folder / "sd15-lora-peft.safetensors",
        "sd15-lora-kohya": folder / "sd15-lora-kohya.safetensors",
        "flux": folder / "flux",
        "flux-lora-peft": folder / "flux-lora-peft.safetensors",
        "flux-lora-kohya": folder / "flux-lora-kohya.safetensors",
        "flux-lora-xlabs": folder / "flux-lora-xlabs.safetensors",
        "flux-lora-bfl": folder / "flux-lora-bfl.safetensors",
        "iclight-fbc": folder / "iclight-fbc.safetensors",
        "rmbg": folder / "rmbg.safetensors",
        **sdxl_family_paths(folder),
    }
    stamp = folder / "tiny.json"
    if not force and stamp.exists() and json.loads(stamp.read_text()).get("version") == TINY_VERSION:
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    pipe = build_sd15_pipeline()
    pipe.save_pretrained(str(paths["sd15"]), safe_serialization=True)
    write_single_file(pipe, paths["sd15-single-file"])
    write_lora_peft(pipe, paths["sd15-lora-peft"])
    write_lora_kohya(pipe, paths["sd15-lora-kohya"])
    write_iclight_offset(pipe, paths["iclight-fbc"])
    from easel.pipelines.rmbg import write_tiny_rmbg

    write_tiny_rmbg(paths["rmbg"])
    flux = build_flux_pipeline()
    flux.save_pretrained(str(paths["flux"]), safe_serialization=True)
    write_flux_lora_peft(flux, paths["flux-lora-peft"])
    write_flux_lora_kohya(flux, paths["flux-lora-kohya"])
    write_flux_lora_xlabs(flux, paths["flux-lora-xlabs"])
    write_flux_lora_bfl(flux, paths["flux-lora-bfl"])
    write_sdxl_family(folder)
    stamp.write_text(json.dumps({"version": TINY_VERSION, "note": "random weights: images are noise"}))
    return paths
