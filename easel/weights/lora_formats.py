"""Which model family and key layout a LoRA file was written for, read from its tensor names.

LoRAs are published in several key layouts; diffusers converts the common ones when loading
(``FluxLoraLoaderMixin.lora_state_dict``, ``StableDiffusionLoraLoaderMixin.lora_state_dict``). It
does not say *which* family a file belongs to, so a LoRA for the wrong model either fails deep in
a converter ("Incompatible keys detected") or silently loads into nothing. Easel reads the names
first and answers with an error that says what the file is and what the tool needs.

Layouts recognised (facts from diffusers' ``lora_conversion_utils`` and the trainers' outputs):

=================  ===========================================================================
layout             typical key
=================  ===========================================================================
``peft``           ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight`` (diffusers,
                   ai-toolkit) or ``unet.down_blocks.1.attentions.0....lora_A.weight``
``kohya``          ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` (sd-scripts on
                   Flux) or ``lora_unet_down_blocks_1_attentions_0_...lora_down.weight`` (SD)
``xlabs``          ``double_blocks.0.processor.qkv_lora1.down.weight`` (XLabs-AI)
``bfl``            ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`` (BFL / original
                   module names, with PEFT or Kohya suffixes, e.g. as ComfyUI saves them)
``kohya-ldm``      ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight``
                   (SD in original LDM naming)
=================  ===========================================================================
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:  # pragma: no cover
    import torch

LoraSource = Union[str, "dict[str, torch.Tensor]"]
"""What diffusers' ``load_lora_weights`` takes: a file path, or a state dict (name → tensor)."""

FAMILY_NAMES = {"flux": "FLUX.1 transformer", "sd": "Stable Diffusion UNet (SD 1.x/2.x/SDXL)"}


class LoraFormatError(ValueError):
    """A LoRA file whose layout is unknown or whose family does not fit the tool."""


@dataclass(frozen=True)
class LoraLayout:
    """``family``: ``flux`` or ``sd``; ``layout``: one of the table above; ``example``: one key."""

    family: str
    layout: str
    example: str


_RULES: list[tuple[str, str, re.Pattern]] = [
    ("flux", "xlabs", re.compile(r"^(diffusion_model\.)?(double|single)_blocks\.\d+\.processor\.(qkv|proj)_lora\d\.(down|up)\.weight$")),
    ("flux", "kohya", re.compile(r"^lora_unet_(double|single)_blocks_\d+_.*\.(lora_down|lora_up)\.weight$")),
    ("flux", "kohya", re.compile(r"^lora_transformer_(single_)?transformer_blocks_\d+_.*\.(lora_down|lora_up)\.weight$")),
    ("flux", "bfl", re.compile(r"^(diffusion_model\.)?(double|single)_blocks\.\d+\..*\.(lora_[AB]|lora_down|lora_up)\.weight$")),
    ("flux", "peft", re.compile(r"^(transformer\.|base_model\.model\.)?(single_)?transformer_blocks\.\d+\..*\.lora_[AB](\.default)?\.weight$")),
    ("sd", "kohya", re.compile(r"^lora_unet_(down_blocks|up_blocks|mid_block)_.*\.(lora_down|lora_up)\.weight$")),
    ("sd", "kohya-ldm", re.compile(r"^lora_unet_(input_blocks|output_blocks|middle_block)_.*\.(lora_down|lora_up)\.weight$")),
    ("sd", "peft", re.compile(r"^(unet\.)?(down_blocks|up_blocks|mid_block)\..*\.(lora_[AB]|lora\.(down|up)|lora_linear_layer\.(down|up))\.weight$")),
]


def detect_lora_layout(keys: list[str] | set[str]) -> LoraLayout:
    """Classify a LoRA by its tensor names.

    Args:
        keys: The state-dict keys (text-encoder keys such as ``lora_te_*`` are ignored: they do
            not tell the family apart).

    Returns:
        The :class:`LoraLayout` of the first rule (table in the module docstring) that most keys
        match.

    Raises:
        LoraFormatError: no known layout matches; the message quotes some of the keys.
    """
    names = sorted(k for k in keys if not k.startswith(("lora_te", "text_encoder", "te_")) and not k.endswith(".alpha"))
    votes: dict[tuple[str, str], list[str]] = {}
    for key in names:
        for family, layout, pattern in _RULES:
            if pattern.match(key):
                votes.setdefault((family, layout), []).append(key)
                break
    if not votes:
        sample = ", ".join(sorted(keys)[:3]) or "(no tensors)"
        raise LoraFormatError(
            f"unknown LoRA key layout (keys like {sample}); known layouts: diffusers/PEFT, Kohya, XLabs, BFL")
    (family, layout), matched = max(votes.items(), key=lambda kv: len(kv[1]))
    return LoraLayout(family, layout, matched[0])


def read_lora_layout(path: str | Path) -> LoraLayout:
    """:func:`detect_lora_layout` on a ``.safetensors`` file, reading only its header.

    Raises:
        LoraFormatError: unknown layout. (A file that is not safetensors raises
            ``easel.net.fetch.FetchError`` from the header check.)
    """
    from easel.net.fetch import check_safetensors

    return detect_lora_layout(set(check_safetensors(Path(path))))


def require_family(path: str | Path, family: str, what: str) -> LoraLayout:
    """Check that the LoRA at ``path`` was made for ``family`` (``flux`` or ``sd``).

    Args:
        what: How the LoRA was given, for the message (e.g. ``selectedLoraModelPrivateUrl``).

    Raises:
        LoraFormatError: naming the layout and family found and the family needed.
    """
    found = read_lora_layout(path)
    if found.family != family:
        raise LoraFormatError(
            f"{what}: this LoRA was made for a {FAMILY_NAMES[found.family]} ({found.layout} layout, keys like "
            f"{found.example}); this tool needs a LoRA for a {FAMILY_NAMES[family]}")
    return found


_BFL_KEY = re.compile(r"^(?:diffusion_model\.)?((?:double|single)_blocks)\.(\d+)\.(.+)\.(lora_A|lora_B|lora_down|lora_up|alpha)(?:\.weight)?$")
_KOHYA_SUFFIX = {"lora_A": "lora_down.weight", "lora_down": "lora_down.weight", "lora_B": "lora_up.weight",
                 "lora_up": "lora_up.weight", "alpha": "alpha"}


def bfl_to_kohya(state_dict: dict) -> dict:
    """Rename a BFL-layout Flux LoRA to the Kohya layout, which diffusers converts.

    diffusers (0.3x–0.4x) reads Flux LoRAs over BFL module names only in Kohya form
    (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``) and silently loads nothing from
    ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``. The mapping is a rename:
    ``.`` in the module path becomes ``_``, ``lora_A``/``lora_B`` become ``lora_down``/``lora_up``
    (no alpha means alpha = rank, i.e. scale 1, in both conventions); tensors are unchanged.

    Raises:
        LoraFormatError: a key outside the BFL block layout.
    """
    out = {}
    for key, value in state_dict.items():
        m = _BFL_KEY.match(key)
        if not m:
            raise LoraFormatError(f"BFL-layout LoRA has a key outside double/single blocks: {key}")
        blocks, index, module, part = m.groups()
        out[f"lora_unet_{blocks}_{index}_{module.replace('.', '_')}.{_KOHYA_SUFFIX[part]}"] = value
    return out


def loadable(path: str | Path) -> LoraSource:
    """What to pass to diffusers' ``load_lora_weights`` for the LoRA file at ``path``: the path
    itself, or for the BFL layout a renamed state dict (:func:`bfl_to_kohya`)."""
    try:
        layout = read_lora_layout(path)
    except (LoraFormatError, ValueError):
        return str(path)  # diffusers gives its own error, which the caller reports
    if layout.layout != "bfl":
        return str(path)
    from safetensors.torch import load_file

    return bfl_to_kohya(load_file(str(path)))
