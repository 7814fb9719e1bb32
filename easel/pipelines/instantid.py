"""InstantID on diffusers' SDXL ControlNet pipeline: face-embedding resampler, IP-Adapter attention,
adapter loading, keypoint drawing, and IdentityNet + user ControlNets as one multi-ControlNet.

Method: Wang et al., *InstantID: Zero-shot Identity-Preserving Generation in Seconds*
(arXiv 2401.07519); reference implementation ``instantX-research/InstantID``
(``pipeline_stable_diffusion_xl_instantid.py``, ``ip_adapter/``). This is Easel's own code on
diffusers' public APIs; it follows the reference where the weights demand it (state-dict names,
token layout, keypoint drawing) and says so where it does.

How the identity enters the model (the embedding enters **twice**):

1. **IP-Adapter** (image prompt adapter, Ye et al. arXiv 2308.06721): the 512-d ArcFace embedding
   of the face goes through a perceiver :class:`Resampler` to ``num_tokens`` (16) tokens of the
   UNet's cross-attention width. These tokens are appended to the text tokens; every
   cross-attention layer of the UNet gets an :class:`IPAttnProcessor` that splits them off again
   and adds ``scale · Attention(q, K_ip, V_ip)`` to the text attention ("decoupled
   cross-attention"), with its own ``to_k_ip`` / ``to_v_ip`` projections. ``scale`` is
   ``ip_adapter_scale``; 0 removes this path exactly.
2. **IdentityNet**: an SDXL ControlNet whose condition image is the five facial keypoints drawn
   by :func:`draw_kps` and whose cross-attention context is the face tokens instead of the text.
   Its residuals are scaled by its ControlNet conditioning scale, independently of
   ``ip_adapter_scale``.

User ControlNets (openpose / depth / canny) run with IdentityNet as one
:class:`InstantIDMultiControlNet`, each at its own scale. As the pipeline both reference demos
use (``pipeline_stable_diffusion_xl_instantid_full.py``): IdentityNet gets the face tokens as its
cross-attention context and the user ControlNets the text tokens, and with "Enhance non-face
region" (:func:`face_box_mask`, :class:`face_region`) IdentityNet's residuals and the IP-Adapter
attention are restricted to the face box.

Tensors: face embedding ``float32 [512]`` (insightface's unnormalised ``Face.embedding``); face
tokens ``[batch, num_tokens, unet.config.cross_attention_dim]`` in the UNet's dtype.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from torch import nn

from easel.pipelines.prompts import encode_sdxl, needs_weighting

NUM_TOKENS = 16
FACE_EMBEDDING_DIM = 512
KPS_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))


class AdapterFormatError(ValueError):
    """An IP-Adapter file that is not an InstantID adapter, or does not fit the UNet."""


# ---------------------------------------------------------------------------------------------
# Resampler (perceiver) for the face embedding


class PerceiverAttention(nn.Module):
    """Latents attend to ``[features; latents]`` (Flamingo's perceiver resampler block).

    Parameter names (``norm1``, ``norm2``, ``to_q``, ``to_kv``, ``to_out``) are those of the
    released InstantID / IP-Adapter-Plus checkpoints.
    """

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """``x``: ``[b, n_features, dim]``; ``latents``: ``[b, n_latents, dim]`` → ``[b, n_latents, dim]``."""
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.view(b, -1, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        # softmax in float32, as the reference does for fp16 stability
        weight = torch.softmax((q.float() @ k.float().transpose(-2, -1)) / math.sqrt(self.dim_head), dim=-1)
        out = (weight.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class Resampler(nn.Module):
    """Perceiver resampler: ``[b, n, embedding_dim]`` features → ``[b, num_queries, output_dim]`` tokens.

    ``latents`` (learned queries) pass ``depth`` × (attention + feed-forward) blocks with residuals,
    then ``proj_out`` and ``norm_out``. InstantID's: dim 1280, depth 4, 20 heads of 64, 16 queries,
    512-d input (the face embedding as one token), 2048-d output (SDXL's cross-attention width).
    """

    def __init__(self, dim: int = 1280, depth: int = 4, dim_head: int = 64, heads: int = 20,
                 num_queries: int = NUM_TOKENS, embedding_dim: int = FACE_EMBEDDING_DIM, output_dim: int = 2048,
                 ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim ** 0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([
                PerceiverAttention(dim, dim_head, heads),
                nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                              nn.Linear(dim * ff_mult, dim, bias=False)),
            ])
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.to(x.dtype).repeat(x.shape[0], 1, 1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


def resampler_from_state_dict(sd: dict[str, torch.Tensor], dim_head: int = 64) -> Resampler:
    """Build a :class:`Resampler` whose sizes are read from ``sd`` and load ``sd`` into it (strict).

    Sizes: ``latents [1, num_queries, dim]``, ``proj_in [dim, embedding_dim]``, ``proj_out
    [output_dim, dim]``, depth = number of ``layers.N``, heads = ``to_q`` rows / ``dim_head``
    (the released InstantID adapter: 1280 / 64 = 20 heads, as its training code).

    Raises:
        AdapterFormatError: keys or shapes that are not a perceiver resampler.
    """
    try:
        _, num_queries, dim = sd["latents"].shape
        embedding_dim = sd["proj_in.weight"].shape[1]
        output_dim = sd["proj_out.weight"].shape[0]
        depth = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
        inner = sd["layers.0.0.to_q.weight"].shape[0]
        ff_mult = sd["layers.0.1.1.weight"].shape[0] // dim
    except (KeyError, ValueError) as exc:
        raise AdapterFormatError(f"image_proj is not a perceiver resampler (missing or odd {exc})") from None
    model = Resampler(dim=dim, depth=depth, dim_head=dim_head, heads=max(1, inner // dim_head),
                      num_queries=num_queries, embedding_dim=embedding_dim, output_dim=output_dim, ff_mult=ff_mult)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise AdapterFormatError(f"image_proj does not load into a resampler: {str(exc).splitlines()[0]}") from None
    return model.eval()


# ---------------------------------------------------------------------------------------------
# IP-Adapter attention (decoupled cross-attention) on diffusers' attention-processor API


class IPAttnProcessor(nn.Module):
    """Cross-attention processor: text attention + ``scale`` × attention to the last ``num_tokens``
    tokens of ``encoder_hidden_states`` through its own ``to_k_ip`` / ``to_v_ip``.

    A diffusers attention processor (called by ``diffusers.models.attention_processor.Attention``
    as ``processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb)``), computed
    with ``F.scaled_dot_product_attention``. ``encoder_hidden_states`` must end with the
    ``num_tokens`` face tokens (``[b, n_text + num_tokens, cross_dim]``). At ``scale == 0`` the
    image branch is skipped, which equals adding zero.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, num_tokens: int = NUM_TOKENS, scale: float = 1.0):
        super().__init__()
        self.hidden_size, self.cross_attention_dim = hidden_size, cross_attention_dim
        self.num_tokens, self.scale = num_tokens, scale
        self.region_mask: torch.Tensor | None = None  # [H, W] in 0..1 at the image's size: see face_region
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if encoder_hidden_states is None:
            raise ValueError("IPAttnProcessor is for cross-attention layers: encoder_hidden_states is required")
        split = encoder_hidden_states.shape[1] - self.num_tokens
        text, ip_tokens = encoder_hidden_states[:, :split], encoder_hidden_states[:, split:]
        batch, seq, _ = text.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        key, value = attn.to_k(text), attn.to_v(text)
        head_dim = key.shape[-1] // attn.heads

        def heads(t):
            return t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query = heads(query)
        out = F.scaled_dot_product_attention(query, heads(key), heads(value), attn_mask=attention_mask)
        if self.scale != 0:
            ip = F.scaled_dot_product_attention(query, heads(self.to_k_ip(ip_tokens)), heads(self.to_v_ip(ip_tokens)))
            if self.region_mask is not None:  # the face region only (the reference's region_control)
                ip = ip * _region_weights(self.region_mask, query.shape[2]).to(ip.dtype)
            out = out + self.scale * ip
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _region_weights(region_mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """The face mask at an attention layer's resolution, ``[1, 1, tokens, 1]``: nearest-neighbour
    down-scaling by ``sqrt(H·W / tokens)`` with ``F.interpolate(scale_factor=…)``, the call the
    reference's ``IPAttnProcessor2_0`` makes (so the same rows and columns are picked). For sides
    that are not multiples of 32 (the tiny models' sizes; the reference's are multiples of 64) the
    UNet's feature maps round up at each downsampling, and the mask is resized to that map's size."""
    h, w = region_mask.shape[:2]
    ratio = (h * w / tokens) ** 0.5
    out = F.interpolate(region_mask[None, None], scale_factor=1 / ratio, mode="nearest")
    if out.numel() != tokens:
        fh, fw = -(-h // 8), -(-w // 8)
        while fh * fw > tokens:
            fh, fw = -(-fh // 2), -(-fw // 2)
        out = F.interpolate(region_mask[None, None], size=(fh, fw), mode="nearest")
    return out.reshape(1, 1, -1, 1)


def ip_layer_shapes(unet) -> dict[int, tuple[int, int]]:
    """Index → ``(hidden_size, cross_attention_dim)`` of each cross-attention layer that carries
    IP-Adapter weights.

    The index is the layer's position in ``unet.attn_processors`` (self-attention layers count
    too, so SDXL's are 1, 3, 5, … 139): this is how the released ``ip-adapter.bin`` numbers its
    ``ip_adapter.<index>.to_k_ip.weight`` keys (the reference loads them into
    ``nn.ModuleList(unet.attn_processors.values())``).
    """
    shapes = {}
    for index, name in enumerate(unet.attn_processors):
        if name.endswith("attn1.processor"):
            continue
        attn = unet.get_submodule(name.removesuffix(".processor"))
        shapes[index] = (attn.to_k.out_features, attn.to_k.in_features)
    return shapes


def install_ip_adapter(unet, ip_state: dict[str, torch.Tensor], num_tokens: int = NUM_TOKENS, scale: float = 1.0) -> None:
    """Put an :class:`IPAttnProcessor` with the adapter's weights on every cross-attention layer.

    Self-attention layers keep their processors. The processors are submodules of the UNet's
    attention modules (they move with ``unet.to``) and live until :func:`remove_ip_adapter`;
    LoRA loading (PEFT wraps ``to_q``/``to_k``/``to_v``/``to_out``) leaves them in place.

    Args:
        ip_state: ``{"<index>.to_k_ip.weight": [hidden, cross], "<index>.to_v_ip.weight": ...}``
            (see :func:`ip_layer_shapes`).

    Raises:
        AdapterFormatError: missing, extra or mis-shaped keys (e.g. an SD 1.5 adapter on SDXL).
    """
    shapes = ip_layer_shapes(unet)
    expected = {f"{i}.{p}.weight" for i in shapes for p in ("to_k_ip", "to_v_ip")}
    missing, extra = expected - set(ip_state), set(ip_state) - expected
    if missing or extra:
        raise AdapterFormatError(
            f"ip_adapter weights do not fit this UNet's {len(shapes)} cross-attention layers "
            f"(missing e.g. {sorted(missing)[:2]}, unexpected e.g. {sorted(extra)[:2]})")
    device, dtype = unet.device, unet.dtype
    procs = dict(unet.attn_processors)
    for index, name in enumerate(list(procs)):
        if index not in shapes:
            continue
        hidden, cross = shapes[index]
        proc = IPAttnProcessor(hidden, cross, num_tokens=num_tokens, scale=scale)
        for part in ("to_k_ip", "to_v_ip"):
            w = ip_state[f"{index}.{part}.weight"]
            if tuple(w.shape) != (hidden, cross):
                raise AdapterFormatError(
                    f"ip_adapter.{index}.{part}.weight has shape {tuple(w.shape)}; this UNet's layer {name} "
                    f"needs {(hidden, cross)} (an adapter for another base model?)")
            getattr(proc, part).weight.data.copy_(w)
        procs[name] = proc.to(device=device, dtype=dtype)
    unet.set_attn_processor(procs)


def set_ip_adapter_scale(unet, scale: float) -> int:
    """Set ``scale`` on every :class:`IPAttnProcessor` of ``unet``; returns how many there are."""
    n = 0
    for proc in unet.attn_processors.values():
        if isinstance(proc, IPAttnProcessor):
            proc.scale = float(scale)
            n += 1
    return n


def has_ip_adapter(unet) -> bool:
    """Whether ``unet`` carries IP-Adapter attention processors."""
    return any(isinstance(p, IPAttnProcessor) for p in unet.attn_processors.values())


def remove_ip_adapter(unet) -> None:
    """Give ``unet`` diffusers' default SDPA attention processor back (it then takes text tokens only).

    (diffusers' ``set_default_attn_processor`` refuses processor types it does not know.)
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())


# ---------------------------------------------------------------------------------------------
# Loading an InstantID adapter file


def load_adapter_file(path: str | Path) -> tuple[dict, dict]:
    """Read an InstantID IP-Adapter: ``(image_proj state dict, ip_adapter state dict)``.

    Formats:
        - ``.safetensors`` with keys ``image_proj.*`` and ``ip_adapter.*``;
        - a torch pickle (``ip-adapter.bin``, the released format) of
          ``{"image_proj": {...}, "ip_adapter": {...}}``. It is read with
          ``torch.load(weights_only=True)``: PyTorch's restricted unpickler, which rebuilds only
          tensors, storages and plain containers and refuses every other global, so a hostile
          pickle cannot run code (the default full unpickler could). Nothing else in the file is
          trusted: the structure is checked below.

    Raises:
        AdapterFormatError: unreadable file, or not the two groups of tensors.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            flat = load_file(str(path))
            groups: dict[str, dict] = {"image_proj": {}, "ip_adapter": {}}
            for key, value in flat.items():
                group, _, rest = key.partition(".")
                if group not in groups or not rest:
                    raise AdapterFormatError(f"{path.name}: unexpected key {key!r} (expected image_proj.* / ip_adapter.*)")
                groups[group][rest] = value
        else:
            groups = torch.load(str(path), map_location="cpu", weights_only=True)
    except AdapterFormatError:
        raise
    except Exception as exc:  # unpickling errors, truncated files, safetensors header errors
        raise AdapterFormatError(f"{path.name} is not a readable IP-Adapter file ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:200]})") from None
    if not isinstance(groups, dict) or not {"image_proj", "ip_adapter"} <= set(groups):
        found = sorted(groups)[:4] if isinstance(groups, dict) else type(groups).__name__
        raise AdapterFormatError(f"{path.name} is not an InstantID IP-Adapter: expected 'image_proj' and "
                                 f"'ip_adapter' groups, found {found}")
    for group in ("image_proj", "ip_adapter"):
        part = groups[group]
        if not isinstance(part, dict) or not part or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise AdapterFormatError(f"{path.name}: '{group}' is not a non-empty dict of tensors")
    return groups["image_proj"], groups["ip_adapter"]


class InstantIDAdapter:
    """The image-projection resampler of a loaded adapter; its attention weights go into the UNet.

    Use :meth:`load` then :meth:`attach` (once per UNet), then :meth:`face_tokens` per request.
    """

    def __init__(self, image_proj: Resampler, ip_state: dict, num_tokens: int):
        self.image_proj = image_proj
        self.ip_state = ip_state
        self.num_tokens = num_tokens

    @classmethod
    def load(cls, path: str | Path) -> "InstantIDAdapter":
        """Read ``path`` (see :func:`load_adapter_file`) and build the resampler.

        Raises:
            AdapterFormatError: as :func:`load_adapter_file` and :func:`resampler_from_state_dict`.
        """
        proj_sd, ip_sd = load_adapter_file(path)
        proj = resampler_from_state_dict(proj_sd)
        return cls(proj, ip_sd, num_tokens=proj.latents.shape[1])

    def attach(self, unet, scale: float = 1.0) -> None:
        """Install the IP-Adapter attention on ``unet`` and move the resampler to its device/dtype.

        Raises:
            AdapterFormatError: the adapter does not fit ``unet`` (other base model).
        """
        out_dim = self.image_proj.proj_out.out_features
        if out_dim != unet.config.cross_attention_dim:
            raise AdapterFormatError(f"the adapter makes {out_dim}-d face tokens; this UNet's cross-attention "
                                     f"is {unet.config.cross_attention_dim}-d (an adapter for another base model?)")
        install_ip_adapter(unet, self.ip_state, self.num_tokens, scale)
        self.image_proj.to(device=unet.device, dtype=unet.dtype)

    @torch.no_grad()
    def face_tokens(self, embedding: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Face tokens for one face and the "unconditional" tokens for classifier-free guidance.

        Args:
            embedding: ``[512]`` (or ``[n, 512]``) float face embedding.

        Returns:
            ``(cond, uncond)``, each ``[1, num_tokens, cross_dim]`` on the resampler's device and
            dtype; ``uncond`` is the resampler applied to a zero embedding, as in the reference.
        """
        p = next(self.image_proj.parameters())
        emb = torch.as_tensor(np.asarray(embedding, dtype=np.float32)).to(device=p.device, dtype=p.dtype)
        emb = emb.reshape(1, -1, self.image_proj.proj_in.in_features)
        return self.image_proj(emb), self.image_proj(torch.zeros_like(emb))


# ---------------------------------------------------------------------------------------------
# Keypoints → IdentityNet condition image


def draw_kps(size: tuple[int, int], kps: Sequence[Sequence[float]], colors: Sequence[tuple[int, int, int]] = KPS_COLORS):
    """Draw the five facial keypoints the way InstantID's IdentityNet was trained to read them.

    Black canvas; the eyes (0, 1) and mouth corners (3, 4) are joined to the nose (2) by filled
    ellipses of half-width 4 px in the colour of the outer point, then the whole canvas is scaled
    by 0.6; a filled disc of radius 10 px in each point's colour is drawn on top. Colours in order
    of the points: red, green, blue, yellow, magenta. Same OpenCV primitives (``ellipse2Poly``
    with 1° steps, ``fillConvexPoly``, ``circle``) and integer truncation as the reference
    ``draw_kps``, so the pixels match it.

    Args:
        size: ``(width, height)`` of the output in pixels.
        kps: five ``(x, y)`` points in pixels (insightface's ``Face.kps`` order).

    Returns:
        RGB ``PIL.Image`` of ``size``.

    Raises:
        ValueError: not five 2-d points.
    """
    import cv2
    from PIL import Image

    kps = np.asarray(kps, dtype=np.float64)
    if kps.shape != (5, 2):
        raise ValueError(f"draw_kps needs five (x, y) keypoints, got shape {kps.shape}")
    width, height = size
    canvas = np.zeros((height, width, 3), dtype=np.float64)
    for outer in (0, 1, 3, 4):
        (x0, y0), (x1, y1) = kps[outer], kps[2]
        length = math.hypot(x0 - x1, y0 - y1)
        angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
        polygon = cv2.ellipse2Poly((int((x0 + x1) / 2), int((y0 + y1) / 2)), (int(length / 2), 4), int(angle), 0, 360, 1)
        canvas = cv2.fillConvexPoly(canvas, polygon, colors[outer])
    canvas = (canvas * 0.6).astype(np.uint8)
    for (x, y), color in zip(kps, colors):
        canvas = cv2.circle(canvas, (int(x), int(y)), 10, color, -1)
    return Image.fromarray(canvas)


# ---------------------------------------------------------------------------------------------
# Loading ControlNets


def load_controlnet(path: str | Path, **kwargs):
    """An SDXL ``ControlNetModel`` from a local folder, in either layout the Hub repos use.

    - diffusers' own: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (IdentityNet's
      ``ControlNetModel/``, ``diffusers/controlnet-{canny,depth}-sdxl-1.0``): ``from_pretrained``;
    - ``config.json`` + one other ``.safetensors`` holding the same diffusers keys
      (``thibaud/controlnet-openpose-sdxl-1.0`` ships ``OpenPoseXL2.safetensors``, its only
      safetensors copy besides a pickled ``.bin``): diffusers' ``from_single_file`` with the
      folder as ``config``.

    Args:
        kwargs: passed to the diffusers loader (e.g. ``torch_dtype``).

    Raises:
        ValueError: no ``config.json``, or no single weights file to choose.
    """
    from diffusers import ControlNetModel

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a ControlNet folder (no config.json)")
    if (folder / "diffusion_pytorch_model.safetensors").is_file():
        return ControlNetModel.from_pretrained(str(folder), use_safetensors=True, **kwargs)
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise ValueError(f"{folder}: expected diffusion_pytorch_model.safetensors or exactly one .safetensors "
                         f"file, found {[f.name for f in files]}")
    return ControlNetModel.from_single_file(str(files[0]), config=str(folder), **kwargs)


# ---------------------------------------------------------------------------------------------
# IdentityNet + user ControlNets


# The resolutions of an SDXL ControlNet's nine down-block residuals (conv_in, three blocks of
# two resnets, two downsamplers), as fractions of the image: the reference's mask scales
MASK_SCALES = (8, 8, 8, 16, 16, 16, 32, 32, 32)


class InstantIDMultiControlNet(MultiControlNetModel):
    """diffusers' ``MultiControlNetModel`` for InstantID: net 0 is IdentityNet, the rest are user
    ControlNets; each runs at its own conditioning scale and the residuals are summed.

    The pipeline hands it ``encoder_hidden_states`` = text tokens followed by the ``num_tokens``
    face tokens (what the IP-Adapter UNet needs). As the reference demos' pipeline
    (``pipeline_stable_diffusion_xl_instantid_full.py``), IdentityNet gets the face tokens as its
    cross-attention context and every other net the **text** tokens; with a face mask
    (:attr:`face_mask`, see :func:`face_region`) IdentityNet's residuals are multiplied by the mask
    at each residual's resolution (bilinear, :data:`MASK_SCALES`), so the identity is imposed in
    the face box only. A net whose scale is exactly 0 is not run (its residuals would be zero), so
    a ControlNet at scale 0 costs nothing and equals leaving it out.
    """

    def __init__(self, controlnets, num_tokens: int = NUM_TOKENS):
        super().__init__(list(controlnets))
        self.num_tokens = num_tokens
        self.face_mask: torch.Tensor | None = None  # [H, W] in 0..1 at the image's size

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, class_labels=None,
                timestep_cond=None, attention_mask=None, added_cond_kwargs=None, cross_attention_kwargs=None,
                guess_mode: bool = False, return_dict: bool = True):
        face = encoder_hidden_states[:, -self.num_tokens:]
        text = encoder_hidden_states[:, :-self.num_tokens]
        down, mid = None, None
        runs = [i for i, s in enumerate(conditioning_scale) if float(s) != 0.0] or [0]
        for i in runs:
            d, m = self.nets[i](
                sample=sample, timestep=timestep, encoder_hidden_states=face if i == 0 else text,
                controlnet_cond=controlnet_cond[i],
                conditioning_scale=conditioning_scale[i], class_labels=class_labels, timestep_cond=timestep_cond,
                attention_mask=attention_mask, added_cond_kwargs=added_cond_kwargs,
                cross_attention_kwargs=cross_attention_kwargs, guess_mode=guess_mode, return_dict=False)
            if i == 0 and self.face_mask is not None:
                weights = mask_pyramid(self.face_mask.to(m.dtype), [r.shape[-2:] for r in d])
                d = [r * w for r, w in zip(d, weights)]
                m = m * weights[-1]
            if down is None:
                down, mid = list(d), m
            else:
                down = [a + b for a, b in zip(down, d)]
                mid = mid + m
        return down, mid


def mask_pyramid(mask: torch.Tensor, sizes: Sequence[tuple[int, int]] | None = None) -> list[torch.Tensor]:
    """``[H, W]`` mask → one ``[1, 1, H // s, W // s]`` bilinear resize per :data:`MASK_SCALES`
    entry, as the reference. ``sizes``: the residuals' own ``(h, w)``, used where they differ
    (sides that are not multiples of 32 round up in the ControlNet; the reference's never do)."""
    h, w = mask.shape[-2:]
    sizes = list(sizes) if sizes is not None else []
    shapes = [tuple(sizes[i]) if i < len(sizes) else (h // s, w // s) for i, s in enumerate(MASK_SCALES)]
    return [F.interpolate(mask[None, None], shape, mode="bilinear") for shape in shapes]


def face_box_mask(size: tuple[int, int], bbox: Sequence[float]) -> np.ndarray:
    """The reference demos' ``control_mask`` ("Enhance non-face region"): a ``[H, W]`` float32
    array, 1 inside the face box (corners truncated to integers, ``[y0:y1, x0:x1]``), 0 elsewhere.

    Args:
        size: ``(width, height)`` of the generated image.
        bbox: ``(x0, y0, x1, y1)`` pixels (insightface ``Face.bbox``).
    """
    width, height = size
    x0, y0, x1, y1 = (int(v) for v in bbox[:4])
    mask = np.zeros((height, width), dtype=np.float32)
    mask[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = 1.0
    return mask


class face_region:
    """Within the block, restrict IdentityNet's residuals and the IP-Adapter attention of ``pipe``
    to ``mask`` (``[H, W]`` array in 0..1 at the generated image's size; None: no restriction), as
    the reference demos' ``_full`` pipeline does with ``control_mask``; the pipeline is left
    unrestricted afterwards. The mask is held in the UNet's dtype (the reference's dtype)."""

    def __init__(self, pipe, mask: np.ndarray | None):
        self.pipe, self.mask = pipe, mask

    def _set(self, value):
        self.pipe.controlnet.face_mask = value
        for proc in self.pipe.unet.attn_processors.values():
            if isinstance(proc, IPAttnProcessor):
                proc.region_mask = value

    def __enter__(self):
        unet = self.pipe.unet
        self._set(None if self.mask is None else
                  torch.as_tensor(np.asarray(self.mask, dtype=np.float32)).to(unet.device, unet.dtype))
        return self

    def __exit__(self, *exc):
        self._set(None)
        return False


def build_pipeline(base, identitynet, controlnets: Sequence = (), num_tokens: int = NUM_TOKENS):
    """An SDXL ControlNet pipeline sharing ``base``'s components, with IdentityNet + ``controlnets``.

    Args:
        base: a ``StableDiffusionXLPipeline`` (or any pipeline with SDXL's components); its UNet
            should carry the IP-Adapter (:meth:`InstantIDAdapter.attach`).
        identitynet: ``ControlNetModel`` of ``InstantX/InstantID`` (``ControlNetModel/``).
        controlnets: further SDXL ``ControlNetModel``\\ s (openpose, depth, canny), in the order
            their condition images and scales will be given to :func:`generate`.

    Returns:
        ``diffusers.StableDiffusionXLControlNetPipeline`` (no new weights are loaded or copied).
    """
    from diffusers import StableDiffusionXLControlNetPipeline

    multi = InstantIDMultiControlNet([identitynet, *controlnets], num_tokens=num_tokens)
    names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
    pipe = StableDiffusionXLControlNetPipeline(**{n: getattr(base, n) for n in names}, controlnet=multi,
                                               add_watermarker=False,
                                               force_zeros_for_empty_prompt=bool(base.config.get("force_zeros_for_empty_prompt", True)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, adapter: InstantIDAdapter, face_embedding, control_images: Sequence, conditioning_scales: Sequence[float],
             ip_adapter_scale: float, prompt: str, negative_prompt: str = "", num_inference_steps: int = 30,
             guidance_scale: float = 5.0, num_images_per_prompt: int = 1, generator=None, width: int | None = None,
             height: int | None = None, callback_on_step_end=None, output_type: str = "pil",
             face_mask: np.ndarray | None = None, **kwargs) -> Any:
    """Run InstantID: text + face tokens through the IP-Adapter UNet, IdentityNet + ControlNets.

    Args:
        pipe: from :func:`build_pipeline`; its UNet carries ``adapter`` (:meth:`InstantIDAdapter.attach`).
        face_embedding: ``[512]`` float embedding of the face (insightface ``Face.embedding``).
        control_images: one PIL image per net: the :func:`draw_kps` image first, then one per user
            ControlNet, in :func:`build_pipeline` order; resized by the pipeline to ``width × height``.
        conditioning_scales: one float per net (IdentityNet's first); 0 skips a net.
        ip_adapter_scale: weight of the IP-Adapter attention (≥ 0; 0 removes that path).
        prompt, negative_prompt: text; with A1111 weights (``(word:1.2)``, ``[word]``) or longer
            than 75 tokens both are encoded as the demos' ``_full`` pipeline does
            (:func:`easel.pipelines.prompts.encode_sdxl`), else by diffusers' ``encode_prompt``.
        num_images_per_prompt: images generated in one batch; ``generator`` may be a list of that length.
        width, height: output size in pixels (multiples of 8); default: the first control image's.
        face_mask: ``[height, width]`` array in 0..1 (:func:`face_box_mask`): IdentityNet and the
            IP-Adapter act inside it only (:class:`face_region`, the demos' "Enhance non-face
            region"); None: everywhere.
        kwargs: passed to the diffusers pipeline (e.g. ``control_guidance_end``).

    Returns:
        The pipeline's output (``.images``: PIL images, or latents with ``output_type="latent"``);
        the latents are decoded by :func:`decode` (in the VAE's own dtype).

    Raises:
        ValueError: the numbers of control images, scales and nets differ, or the UNet has no
            IP-Adapter.
    """
    nets = len(pipe.controlnet.nets)
    if len(control_images) != nets or len(conditioning_scales) != nets:
        raise ValueError(f"{nets} ControlNets need {nets} control images and scales, got "
                         f"{len(control_images)} and {len(conditioning_scales)}")
    if set_ip_adapter_scale(pipe.unet, ip_adapter_scale) == 0:
        raise ValueError("the UNet has no IP-Adapter attention; call InstantIDAdapter.attach(pipe.unet) first")
    cfg = guidance_scale > 1
    device = pipe._execution_device
    if needs_weighting(pipe.tokenizer, prompt, negative_prompt):  # weights or > 75 tokens: the _full pipeline's encoding
        pe, npe, pooled, npooled = (t.to(device) for t in encode_sdxl(pipe, prompt, negative_prompt))
    else:  # a plain prompt: diffusers' own encoding, unchanged
        pe, npe, pooled, npooled = pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=cfg,
                                                      negative_prompt=negative_prompt or None)
    cond, uncond = adapter.face_tokens(face_embedding)
    call: dict[str, Any] = dict(prompt_embeds=torch.cat([pe, cond.to(pe.device, pe.dtype)], dim=1), pooled_prompt_embeds=pooled)
    if cfg:
        call.update(negative_prompt_embeds=torch.cat([npe, uncond.to(npe.device, npe.dtype)], dim=1),
                    negative_pooled_prompt_embeds=npooled)
    width = width or control_images[0].size[0]
    height = height or control_images[0].size[1]
    if face_mask is not None and tuple(np.shape(face_mask)) != (height, width):
        raise ValueError(f"face_mask must be [{height}, {width}] (the image's size), got {list(np.shape(face_mask))}")
    with face_region(pipe, face_mask):
        out = pipe(image=list(control_images), controlnet_conditioning_scale=[float(s) for s in conditioning_scales],
                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                   num_images_per_prompt=num_images_per_prompt, generator=generator, width=width, height=height,
                   callback_on_step_end=callback_on_step_end, output_type="latent", **call, **kwargs)
    if output_type != "latent":
        out.images = decode(pipe, out.images, output_type)
    return out


@torch.no_grad()
def decode(pipe, latents: torch.Tensor, output_type: str = "pil") -> Any:
    """SDXL latents ``[b, 4, h, w]`` (any dtype, on the pipeline's execution device) → images, with
    the VAE in the dtype it is held in.

    diffusers' SDXL pipelines decode a float16 VAE whose config says ``force_upcast`` by casting it
    to float32 and back on every call (``upcast_vae``, deprecated, with a warning each time); Easel
    holds such a VAE in float32 instead (``easel.weights.precision.Precision.vae_dtype_for``), and
    this decodes in whatever dtype the VAE has, so the fp16 UNet's latents never meet fp32 weights
    unconverted. Denormalisation as diffusers: ``latents · std / scaling_factor + mean`` when the
    config has ``latents_mean``/``latents_std``, else ``latents / scaling_factor``.

    Returns:
        ``pipe.image_processor.postprocess(image, output_type)``: PIL images, ``np`` or ``pt``.
    """
    vae = pipe.vae
    latents = latents.to(dtype=vae.dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)
