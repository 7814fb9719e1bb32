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

TINY_VERSION = 1
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
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
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


def write_lora_peft(pipe, path: Path, seed: int = 1) -> None:
    """Write a diffusers/PEFT-layout LoRA file (keys ``unet.<module>.lora_A/B.weight``)."""
    from safetensors.torch import save_file

    sd = {f"unet.{k}": v for k, v in _random_unet_lora(pipe, seed).items()}
    save_file(sd, str(path), metadata={"format": "pt"})


def write_lora_kohya(pipe, path: Path, seed: int = 2, alpha: float = 4.0) -> None:
    """Write a Kohya-layout LoRA file (``lora_unet_<module_with_underscores>.lora_down/up.weight``, ``.alpha``)."""
    import torch
    from safetensors.torch import save_file

    sd = {}
    for key, value in _random_unet_lora(pipe, seed).items():
        module, _, kind = key.rpartition(".lora_")
        base = "lora_unet_" + module.replace(".", "_")
        sd[f"{base}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        sd[f"{base}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path), metadata={"ss_network_module": "networks.lora"})


def make_tiny(folder: str | Path, force: bool = False) -> dict[str, Path]:
    """Write every tiny model into ``folder`` (idempotent unless ``force``).

    Returns:
        Name → path: ``sd15`` (folder), ``sd15-single-file``, ``sd15-lora-peft``, ``sd15-lora-kohya``.
    """
    folder = Path(folder)
    paths = {
        "sd15": folder / "sd15",
        "sd15-single-file": folder / "sd15-single-file.safetensors",
        "sd15-lora-peft": folder / "sd15-lora-peft.safetensors",
        "sd15-lora-kohya": folder / "sd15-lora-kohya.safetensors",
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
    stamp.write_text(json.dumps({"version": TINY_VERSION, "note": "random weights: images are noise"}))
    return paths
