"""BRIA RMBG-1.4, the foreground matting network IC-Light uses (``briaai/RMBG-1.4``).

The architecture is IS-Net (Qin et al., "Highly Accurate Dichotomous Image Segmentation", 2022):
a U²-Net of residual U-blocks (RSU-7 … RSU-4 with pooling, RSU-4F with dilations instead), a
stride-2 stem, six encoder stages, five decoder stages and side outputs. Module and parameter
names follow the published checkpoint (``conv_in``, ``stage1.rebnconvin.conv_s1``,
``stage1.rebnconvin.bn_s1``, …, ``side1``), so ``model.safetensors`` from the Hub loads with
``load_state_dict``; only the first side output (the finest, ``side1``) is computed, which is the
mask IC-Light's reference (``gradio_demo_bg.py``, ``run_rmbg``) uses.

``width_div`` divides every channel count (1 for the real network; the tiny offline model uses
16); :func:`load_rmbg` infers it from the stem's weight shape.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# (kind, in, mid, out) of the stages at full width; kind = number of levels, or "4F"
STAGES = {
    "stage1": (7, 64, 32, 64), "stage2": (6, 64, 32, 128), "stage3": (5, 128, 64, 256), "stage4": (4, 256, 128, 512),
    "stage5": ("4F", 512, 256, 512), "stage6": ("4F", 512, 256, 512),
    "stage5d": ("4F", 1024, 256, 512), "stage4d": (4, 1024, 128, 256), "stage3d": (5, 512, 64, 128),
    "stage2d": (6, 256, 32, 64), "stage1d": (7, 128, 16, 64),
}
SIDES = {"side1": 64, "side2": 64, "side3": 128, "side4": 256, "side5": 512, "side6": 512}


class ConvBnRelu(nn.Module):
    """3×3 convolution (dilation ``d``, padding ``d``) → BatchNorm → ReLU (checkpoint names ``conv_s1``/``bn_s1``)."""

    def __init__(self, cin: int, cout: int, d: int = 1):
        super().__init__()
        self.conv_s1 = nn.Conv2d(cin, cout, 3, padding=d, dilation=d)
        self.bn_s1 = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn_s1(self.conv_s1(x)))


def _up(x, like):
    return F.interpolate(x, size=like.shape[2:], mode="bilinear")


def _pool(x):
    return F.max_pool2d(x, 2, stride=2, ceil_mode=True)


class RSU(nn.Module):
    """Residual U-block of ``levels`` levels (RSU-L): an encoder with 2× max-pooling between the
    first ``levels - 1`` convolutions, a dilated bottom convolution, a decoder with bilinear
    upsampling and skip concatenations; the output is added to the input convolution's."""

    def __init__(self, levels: int, cin: int, mid: int, cout: int):
        super().__init__()
        self.levels = levels
        self.rebnconvin = ConvBnRelu(cin, cout)
        self.rebnconv1 = ConvBnRelu(cout, mid)
        for i in range(2, levels):
            setattr(self, f"rebnconv{i}", ConvBnRelu(mid, mid))
        setattr(self, f"rebnconv{levels}", ConvBnRelu(mid, mid, d=2))
        for i in range(levels - 1, 1, -1):
            setattr(self, f"rebnconv{i}d", ConvBnRelu(2 * mid, mid))
        self.rebnconv1d = ConvBnRelu(2 * mid, cout)

    def forward(self, x):
        hxin = self.rebnconvin(x)
        enc = [self.rebnconv1(hxin)]
        for i in range(2, self.levels):
            enc.append(getattr(self, f"rebnconv{i}")(_pool(enc[-1])))
        d = getattr(self, f"rebnconv{self.levels}")(enc[-1])
        for i in range(self.levels - 1, 0, -1):
            skip = enc[i - 1]
            d = getattr(self, f"rebnconv{i}d")(torch.cat((_up(d, skip) if d.shape[2:] != skip.shape[2:] else d, skip), 1))
        return d + hxin


class RSU4F(nn.Module):
    """RSU-4F: four levels at full resolution with dilations 1, 2, 4, 8 instead of pooling."""

    def __init__(self, cin: int, mid: int, cout: int):
        super().__init__()
        self.rebnconvin = ConvBnRelu(cin, cout)
        self.rebnconv1 = ConvBnRelu(cout, mid, 1)
        self.rebnconv2 = ConvBnRelu(mid, mid, 2)
        self.rebnconv3 = ConvBnRelu(mid, mid, 4)
        self.rebnconv4 = ConvBnRelu(mid, mid, 8)
        self.rebnconv3d = ConvBnRelu(2 * mid, mid, 4)
        self.rebnconv2d = ConvBnRelu(2 * mid, mid, 2)
        self.rebnconv1d = ConvBnRelu(2 * mid, cout, 1)

    def forward(self, x):
        hxin = self.rebnconvin(x)
        h1 = self.rebnconv1(hxin)
        h2 = self.rebnconv2(h1)
        h3 = self.rebnconv3(h2)
        h4 = self.rebnconv4(h3)
        d3 = self.rebnconv3d(torch.cat((h4, h3), 1))
        d2 = self.rebnconv2d(torch.cat((d3, h2), 1))
        return self.rebnconv1d(torch.cat((d2, h1), 1)) + hxin


class BriaRMBG(nn.Module):
    """RMBG-1.4 / IS-Net. ``forward(x)`` takes ``[B, 3, H, W]`` float32 images normalised as IC-Light
    does (``pixel / 127 - 1``) and returns the alpha matte ``[B, 1, H, W]`` in ``[0, 1]``."""

    def __init__(self, in_ch: int = 3, out_ch: int = 1, width_div: int = 1):
        super().__init__()
        c = lambda n: max(1, n // width_div)  # noqa: E731
        self.width_div = width_div
        self.conv_in = nn.Conv2d(in_ch, c(64), 3, stride=2, padding=1)
        for name, (kind, cin, mid, cout) in STAGES.items():
            block = RSU4F(c(cin), c(mid), c(cout)) if kind == "4F" else RSU(kind, c(cin), c(mid), c(cout))
            setattr(self, name, block)
        for name, cin in SIDES.items():
            setattr(self, name, nn.Conv2d(c(cin), out_ch, 3, padding=1))

    def forward(self, x):
        hx1 = self.stage1(self.conv_in(x))
        hx2 = self.stage2(_pool(hx1))
        hx3 = self.stage3(_pool(hx2))
        hx4 = self.stage4(_pool(hx3))
        hx5 = self.stage5(_pool(hx4))
        hx6 = self.stage6(_pool(hx5))
        d5 = self.stage5d(torch.cat((_up(hx6, hx5), hx5), 1))
        d4 = self.stage4d(torch.cat((_up(d5, hx4), hx4), 1))
        d3 = self.stage3d(torch.cat((_up(d4, hx3), hx3), 1))
        d2 = self.stage2d(torch.cat((_up(d3, hx2), hx2), 1))
        d1 = self.stage1d(torch.cat((_up(d2, hx1), hx1), 1))
        return torch.sigmoid(_up(self.side1(d1), x))


def load_rmbg(path: str | Path, device: str = "cpu") -> BriaRMBG:
    """Load RMBG-1.4 weights (``model.safetensors``) into :class:`BriaRMBG`, float32, eval mode.

    The channel divisor is read from ``conv_in.weight``'s shape (64 output channels → the real
    network). Only BatchNorm's ``num_batches_tracked`` counters may be absent from the file.

    Raises:
        ValueError: the file's tensors do not match the network (another architecture).
    """
    from safetensors.torch import load_file

    state = load_file(str(path))
    stem = state.get("conv_in.weight")
    if stem is None or stem.ndim != 4 or 64 % stem.shape[0]:
        raise ValueError(f"{Path(path).name} is not an RMBG-1.4 checkpoint (no 3x3 conv_in with 64/k channels)")
    net = BriaRMBG(in_ch=stem.shape[1], out_ch=state["side1.weight"].shape[0], width_div=64 // stem.shape[0])
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ValueError(f"{Path(path).name} does not match the RMBG-1.4 network: {str(exc)[:300]}") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{Path(path).name} does not match the RMBG-1.4 network "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return net.eval().to(device=device, dtype=torch.float32)


def write_tiny_rmbg(path: Path, seed: int = 21, width_div: int = 16) -> None:
    """Write a tiny random RMBG network (channels / ``width_div``) as ``model.safetensors`` keys."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    net = BriaRMBG(width_div=width_div)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode is exercised
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
