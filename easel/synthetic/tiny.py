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
import re
from pathlib import Path

TINY_VERSION = 8
_SEED = 0


def _clip_vocab() -> dict[str, int]:
    """A byte-level BPE vocabulary with every single byte symbol (with and without ``</w>``)."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    symbols = [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def write_clip_tokenizer(folder: Path):
    """Write a CLIP tokenizer (``vocab.json``, ``merges.txt``, configs) to ``folder``; return it."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = _clip_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(str(folder))
    return tok


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


# ---------------------------------------------------------------------------------------------
# diffusers → original LDM key layout (the inverse of diffusers' single-file conversion).
# Facts from diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py, generalised to
# any number of blocks / layers per block so that tiny models convert with the same rules.


def _unet_to_ldm(sd: dict, config: dict) -> dict:
    lpb = config["layers_per_block"]
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
              "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
    out = {}
    for key, value in sd.items():
        new = None
        for hf, ldm in top.items():
            if key.startswith(hf + "."):
                new = ldm + key[len(hf):]
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
        if m:
            side, i, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if part == "resnets":
                rest = _replace_head(rest, resnet)
            if side == "down":
                if part == "downsamplers":
                    new = f"input_blocks.{(i + 1) * (lpb + 1)}.0.op.{rest.removeprefix('conv.')}"
                else:
                    new = f"input_blocks.{1 + i * (lpb + 1) + j}.{0 if part == 'resnets' else 1}.{rest}"
            else:
                if part == "upsamplers":
                    new = f"output_blocks.{i * (lpb + 1) + lpb}.{2 if up_has_attn[i] else 1}.{rest}"
                else:
                    new = f"output_blocks.{i * (lpb + 1) + j}.{0 if part == 'resnets' else 1}.{rest}"
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        if m:
            part, j, rest = m.group(1), int(m.group(2)), m.group(3)
            if part == "resnets":
                new = f"middle_block.{2 * j}.{_replace_head(rest, resnet)}"
            else:
                new = f"middle_block.1.{rest}"
        if new is None:
            raise ValueError(f"no LDM name for UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


def _replace_head(rest: str, table: dict) -> str:
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}"


def _vae_to_ldm(sd: dict, config: dict) -> dict:
    n = len(config["block_out_channels"])
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in sd.items():
        new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        m = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", new)
        if m:
            coder, side, i, part, j, rest = m.groups()
            i = int(i)
            level = i if side == "down" else n - 1 - i
            if part == "resnets":
                new = f"{coder}.{side}.{level}.block.{j}.{rest}"
            else:
                new = f"{coder}.{side}.{level}.{'downsample' if side == 'down' else 'upsample'}.{rest}"
        m = re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", new)
        if m:
            new = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3)}"
        m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)$", new)
        if m:
            new = f"{m.group(1)}.mid.attn_1.{attn[m.group(2)]}.{m.group(3)}"
            if m.group(3) == "weight" and m.group(2) != "group_norm":
                value = value.reshape(*value.shape, 1, 1)  # LDM stores these projections as 1x1 convs
        out["first_stage_model." + new] = value
    return out


def _text_encoder_to_ldm(sd: dict) -> dict:
    out = {}
    for key, value in sd.items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out["cond_stage_model.transformer." + key] = value
    return out


def write_single_file(pipe, path: Path) -> None:
    """Save ``pipe``'s UNet, VAE and text encoder as one original-LDM-layout ``.safetensors``."""
    from safetensors.torch import save_file

    sd = {}
    sd.update(_unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config)))
    sd.update(_vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)))
    sd.update(_text_encoder_to_ldm(pipe.text_encoder.state_dict()))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


# ---------------------------------------------------------------------------------------------
# LoRAs


def _random_unet_lora(pipe, seed: int, rank: int = 4) -> dict:
    """A PEFT-named LoRA state dict (``<module>.lora_A.weight``) for the UNet's attention projections."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in pipe.unet.named_modules():
        if re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", name):
            sd[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.5
            sd[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.5
    return sd


def write_lora_peft(pipe, path: Path, seed: int = 1, rank: int = 4) -> None:
    """Write a diffusers/PEFT-layout LoRA file (keys ``unet.<module>.lora_A/B.weight``)."""
    from safetensors.torch import save_file

    sd = {f"unet.{k}": v for k, v in _random_unet_lora(pipe, seed, rank).items()}
    save_file(sd, str(path), metadata={"format": "pt"})


def write_lora_kohya(pipe, path: Path, seed: int = 2, alpha: float = 4.0, rank: int = 4) -> None:
    """Write a Kohya-layout LoRA file (``lora_unet_<module_with_underscores>.lora_down/up.weight``, ``.alpha``)."""
    import torch
    from safetensors.torch import save_file

    sd = {}
    for key, value in _random_unet_lora(pipe, seed, rank).items():
        module, _, kind = key.rpartition(".lora_")
        base = "lora_unet_" + module.replace(".", "_")
        sd[f"{base}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        sd[f"{base}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path), metadata={"ss_network_module": "networks.lora"})


# ---------------------------------------------------------------------------------------------
# FLUX.1


def write_t5_tokenizer(folder: Path):
    """Write a T5 (unigram) tokenizer covering printable ASCII to ``folder``; return it.

    The vocabulary is ``<pad>`` (0), ``</s>`` (1), ``<unk>`` (2), then ``▁``-prefixed and bare
    characters, the SentencePiece conventions of ``google/t5-v1_1-xxl``'s tokenizer.
    """
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
    return tok


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


def _flux_dims(pipe) -> tuple[int, int, int]:
    cfg = pipe.transformer.config
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    return inner, cfg.num_layers, cfg.num_single_layers


def write_flux_lora_peft(pipe, path: Path, seed: int = 11, rank: int = 4) -> None:
    """Write a diffusers/PEFT-layout Flux LoRA (``transformer.<module>.lora_A/B.weight``) for every
    attention projection and the single blocks' ``proj_out`` (a superset of the modules the Kohya
    and XLabs tiny LoRAs target, so those can be hot-swapped into a slot holding this one)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    pattern = r"(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)|single_transformer_blocks\.\d+\.proj_out)$"
    for name, module in pipe.transformer.named_modules():
        if re.search(pattern, name):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.5
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.5
    save_file(sd, str(path), metadata={"format": "pt"})


def _bfl_modules(pipe) -> dict[str, tuple[int, int]]:
    """BFL module names a Flux LoRA commonly targets → (fan_in, fan_out): fused ``img_attn.qkv`` /
    ``txt_attn.qkv``, ``*_attn.proj`` of the double blocks and ``linear2`` of the single blocks."""
    inner, n_double, n_single = _flux_dims(pipe)
    mlp = int(inner * pipe.transformer.config.get("mlp_ratio", 4.0))
    shapes = {}
    for i in range(n_double):
        for side in ("img", "txt"):
            shapes[f"double_blocks.{i}.{side}_attn.qkv"] = (inner, 3 * inner)
            shapes[f"double_blocks.{i}.{side}_attn.proj"] = (inner, inner)
    for i in range(n_single):
        shapes[f"single_blocks.{i}.linear2"] = (inner + mlp, inner)
    return shapes


def _write_bfl_named(pipe, path: Path, seed: int, rank: int, name, down: str, up: str, alpha: float | None,
                     metadata: dict | None = None) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for module, (fan_in, fan_out) in _bfl_modules(pipe).items():
        base = name(module)
        sd[f"{base}.{down}"] = torch.randn(rank, fan_in, generator=g) * 0.5
        sd[f"{base}.{up}"] = torch.randn(fan_out, rank, generator=g) * 0.5
        if alpha is not None:
            sd[f"{base}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path), metadata=metadata)


def write_flux_lora_kohya(pipe, path: Path, seed: int = 12, rank: int = 4, alpha: float = 4.0) -> None:
    """Write a Kohya-layout Flux LoRA over BFL module names, as sd-scripts' ``flux_train_network``
    saves it (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``, ``.alpha``)."""
    _write_bfl_named(pipe, path, seed, rank, lambda m: "lora_unet_" + m.replace(".", "_"), "lora_down.weight",
                     "lora_up.weight", alpha, {"ss_network_module": "networks.lora_flux"})


def write_flux_lora_xlabs(pipe, path: Path, seed: int = 13, rank: int = 4) -> None:
    """Write an XLabs-layout Flux LoRA (``double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight``),
    the format of ``XLabs-AI/flux-RealismLora``."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    inner, n_double, _ = _flux_dims(pipe)
    sd = {}
    for i in range(n_double):
        for n in (1, 2):
            for kind, out in (("qkv", 3 * inner), ("proj", inner)):
                base = f"double_blocks.{i}.processor.{kind}_lora{n}"
                sd[f"{base}.down.weight"] = torch.randn(rank, inner, generator=g) * 0.5
                sd[f"{base}.up.weight"] = torch.randn(out, rank, generator=g) * 0.5
    save_file(sd, str(path))


def write_flux_lora_bfl(pipe, path: Path, seed: int = 14, rank: int = 4) -> None:
    """Write a BFL-layout Flux LoRA: original module names (``diffusion_model.double_blocks.N.img_attn.qkv``,
    ``diffusion_model.single_blocks.N.linear2``) with PEFT ``lora_A``/``lora_B`` suffixes."""
    _write_bfl_named(pipe, path, seed, rank, lambda m: "diffusion_model." + m, "lora_A.weight", "lora_B.weight", None)


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
