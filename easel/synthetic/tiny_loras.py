"""Random LoRA files in the layouts LoRAs are published in, for the tiny and full-size models.

- SD-family UNets: diffusers/PEFT (``unet.<module>.lora_A.weight``, as ``save_lora_weights``
  writes) and Kohya (``lora_unet_<module>.lora_down.weight`` + ``.alpha``).
- FLUX.1 transformers: PEFT (``transformer.<module>.lora_A.weight``), Kohya over BFL module names
  (``lora_unet_double_blocks_0_img_attn_qkv``), XLabs (``double_blocks.N.processor.qkv_lora1``) and
  BFL (``diffusion_model.double_blocks.N.img_attn.qkv.lora_A``).

Values are ``0.5 · N(0, 1)`` with a fixed seed per file, so each LoRA visibly changes the image.
"""
from __future__ import annotations

import re
from pathlib import Path


def random_unet_lora(pipe, seed: int, rank: int = 4) -> dict:
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

    sd = {f"unet.{k}": v for k, v in random_unet_lora(pipe, seed, rank).items()}
    save_file(sd, str(path), metadata={"format": "pt"})


def write_lora_kohya(pipe, path: Path, seed: int = 2, alpha: float = 4.0, rank: int = 4) -> None:
    """Write a Kohya-layout LoRA file (``lora_unet_<module_with_underscores>.lora_down/up.weight``, ``.alpha``)."""
    import torch
    from safetensors.torch import save_file

    sd = {}
    for key, value in random_unet_lora(pipe, seed, rank).items():
        module, _, kind = key.rpartition(".lora_")
        base = "lora_unet_" + module.replace(".", "_")
        sd[f"{base}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        sd[f"{base}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path), metadata={"ss_network_module": "networks.lora"})



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

