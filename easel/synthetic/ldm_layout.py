"""diffusers → original LDM/SGM key layout: the inverse of diffusers' single-file conversion.

Facts from diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py``, generalised to
any number of blocks / layers per block so that tiny models convert with the same rules. Used by
the single-file writers of ``easel.synthetic.tiny`` (SD 1.5) and ``easel.synthetic.tiny_sdxl``
(SDXL, OpenCLIP-G naming) and by the SDXL Kohya LoRA writer (SGM module names).
"""
from __future__ import annotations

import re


def unet_to_ldm(sd: dict, config: dict) -> dict:
    """A diffusers ``UNet2DConditionModel`` state dict → original LDM/SGM names under
    ``model.diffusion_model.`` (``config``: the UNet's config, for ``layers_per_block`` and the
    up-block types). Values are passed through unchanged. Raises ``ValueError`` for a key with no
    LDM name."""
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


def vae_to_ldm(sd: dict, config: dict) -> dict:
    """A diffusers ``AutoencoderKL`` state dict → LDM names under ``first_stage_model.``; the
    mid-block attention projections are reshaped to 1×1 convolutions as LDM stores them."""
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


def text_encoder_to_ldm(sd: dict) -> dict:
    """A transformers ``CLIPTextModel`` state dict → LDM names under
    ``cond_stage_model.transformer.text_model.``."""
    out = {}
    for key, value in sd.items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out["cond_stage_model.transformer." + key] = value
    return out



def open_clip_to_ldm(sd: dict, prefix: str) -> dict:
    """``CLIPTextModelWithProjection`` weights → OpenCLIP names (the inverse of diffusers'
    ``convert_open_clip_checkpoint``): q/k/v fused into ``attn.in_proj_*``, ``text_projection``
    stored transposed."""
    import torch

    out, fused = {}, {}
    for key, value in sd.items():
        k = key.removeprefix("text_model.")
        if k == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif k == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif k.startswith("final_layer_norm."):
            out[prefix + "ln_final." + k.rsplit(".", 1)[1]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif k.startswith("encoder.layers."):
            m = re.match(r"encoder\.layers\.(\d+)\.(.*)\.(weight|bias)$", k)
            layer, module, kind = m.groups()
            base = f"{prefix}transformer.resblocks.{layer}."
            qkv = re.match(r"self_attn\.([qkv])_proj$", module)
            if qkv:
                fused.setdefault((base, kind), {})[qkv.group(1)] = value
                continue
            name = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}[module]
            out[f"{base}{name}.{kind}"] = value
        elif "position_ids" not in k:
            raise ValueError(f"no OpenCLIP name for text encoder key {key}")
    for (base, kind), parts in fused.items():
        out[f"{base}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out
