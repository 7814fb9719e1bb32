"""Where a tool's networks run and in which dtypes: **the one place that asks whether CUDA exists**.

Every tool asks :meth:`easel.weights.ModelManager.precision` (or :func:`precision` here) for a
*kind* of pipeline and gets a :class:`Precision`: the device, the dtype of its networks and the
dtype of its VAE. The table is built from the tools' declarations (each model family declares its
row, and the rows of the auxiliary networks it loads: ``easel.tools.base.Family``, collected by
:func:`easel.tools.registry.dtype_kinds`); the dtypes are the reference implementations'. With the
built-in tools:

===============  =================================  ========  ==============================================
kind             networks                           dtype     VAE
===============  =================================  ========  ==============================================
``sd15``         UNet, CLIP text encoder, LoRAs     float16   float16 (decoded in float16, as diffusers'
                                                              SD 1.5 pipeline does)
``sdxl``         UNet, both text encoders,          float16   float32 when its config says ``force_upcast``
(``instantid``)  ControlNets, IP-Adapter resampler            (the SDXL VAE overflows in float16; diffusers'
                 and attention, LoRAs                         SDXL pipelines upcast it for every decode),
                                                              else float16
``flux``         transformer, CLIP, T5, LoRA        bfloat16  bfloat16
``ic-light``     UNet (+ offset), text encoder      float16   bfloat16 (as ``gradio_demo_bg.py``)
``condition``    DPT depth                          float16   (none)
``matting``      RMBG-1.4                           float32   (none; float32 everywhere, as the reference)
===============  =================================  ========  ==============================================

On CUDA the table applies. On the CPU everything is float32 by default, because half precision
on a CPU is slow and only useful to check the GPU path; ``Settings.weights.cpu_precision = "half"``
(``EASEL_CPU_PRECISION=half``) runs the CPU in the table's dtypes too, so the exact dtype
combinations of the GPU path (fp16 UNet with fp16 LoRA layers, bf16 FLUX transformer,
fp16 IC-Light UNet fed by a bf16 VAE, fp16 IP-Adapter attention...) execute, and are tested, on a
machine without a GPU. PyTorch 2.13 has CPU kernels for Half and BFloat16 for every op these
pipelines call (the tests run all five tools so). The one CPU gap found is antialiased
``interpolate`` (``_upsample_bilinear2d_aa`` / ``_upsample_bicubic2d_aa``: "compute_index_ranges_weights
not implemented for 'Half'", and for 'BFloat16' too, so a bfloat16 stand-in would not help); no tool
resizes a half tensor with ``antialias=True`` (images are resized with PIL, or in float32), so no
stand-in dtype is used: the CPU runs exactly the CUDA dtypes.

Seeds: every tool draws its noise from CPU ``torch.Generator``\\ s (:func:`generators`), as
diffusers advises for reproducibility ("If reproducibility is important, you should use a CPU
Generator"): ``randn_tensor`` samples on the CPU and moves the noise to the device, so a seed gives
the same initial noise on the CPU and on any GPU (a CUDA generator samples with another algorithm
and would tie a seed's image to the device), and a CPU run with ``cpu_precision = "half"`` starts
from the very noise the GPU run starts from.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, TypeVar

from easel.config import check_cpu_precision

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import AutoencoderKL, DiffusionPipeline

M = TypeVar("M", bound="torch.nn.Module")
P = TypeVar("P", bound="DiffusionPipeline")



def kinds() -> tuple[str, ...]:
    """Every precision kind the registered tools declare (families and their auxiliary networks)."""
    from easel.tools.registry import dtype_kinds

    return tuple(dtype_kinds())


class Precision(NamedTuple):
    """Where and how a kind of pipeline runs.

    Attributes:
        device: ``"cuda"`` or ``"cpu"`` (a worker sees one GPU: ``CUDA_VISIBLE_DEVICES``).
        dtype: ``torch.dtype`` of the networks (denoiser, text encoders, ControlNets, adapters).
        vae_dtype: ``torch.dtype`` of the VAE's weights (IC-Light's differs from ``dtype``); see
            :meth:`vae_dtype_for` for a VAE whose config asks for float32 decoding.
        vae_upcast: whether a float16 VAE whose config says ``force_upcast`` is held in float32
            (the SDXL kinds).
    """

    device: str
    dtype: torch.dtype
    vae_dtype: torch.dtype
    vae_upcast: bool = False

    def vae_dtype_for(self, vae: AutoencoderKL) -> torch.dtype:
        """The dtype to hold ``vae`` (an ``AutoencoderKL``) in: float32 instead of float16 when
        :attr:`vae_upcast` and its config says ``force_upcast``, else :attr:`vae_dtype`.

        Holding it in float32 is what diffusers' SDXL pipelines do for every decode (they cast a
        float16 VAE up, decode, and cast it back, with a deprecation warning), done once at load.
        """
        import torch

        if self.vae_upcast and self.vae_dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            return torch.float32
        return self.vae_dtype


def cuda_available() -> bool:
    """Whether this process may use CUDA: the only ``torch.cuda.is_available()`` call of the tools
    and models (False when torch has no CUDA build, or no device is visible)."""
    import torch

    return torch.cuda.is_available()


def catalog_dtypes(kind: str) -> tuple[torch.dtype, torch.dtype]:
    """``(dtype, vae_dtype)`` of ``kind`` on CUDA (the table above).

    Raises:
        ValueError: an unknown kind (the message lists :func:`kinds`).
    """
    import torch

    from easel.tools.registry import dtype_kinds

    rows = dtype_kinds()
    if kind not in rows:
        raise ValueError(f"unknown precision kind {kind!r}; one of {', '.join(rows)}")
    return getattr(torch, rows[kind].dtype), getattr(torch, rows[kind].vae_dtype)


def precision(kind: str, cpu_precision: str = "float32") -> Precision:
    """The device and dtypes a ``kind`` of pipeline runs in (see the module docstring).

    Args:
        kind: one of :func:`kinds` (the model families, and the auxiliary networks' kinds, e.g.
            ``condition`` for DPT and ``matting`` for RMBG).
        cpu_precision: without CUDA, ``"float32"`` (everything float32) or ``"half"`` (the CUDA
            dtypes); ``Settings.weights.cpu_precision``.

    Returns:
        ``Precision(device, dtype, vae_dtype, vae_upcast)``: the catalog dtypes on ``"cuda"``, and
        on ``"cpu"`` either float32 twice or the catalog dtypes.

    Raises:
        ValueError: an unknown kind or ``cpu_precision``.
    """
    import torch

    from easel.tools.registry import dtype_kinds

    check_cpu_precision(cpu_precision)
    dtype, vae_dtype = catalog_dtypes(kind)
    upcast = dtype_kinds()[kind].vae_upcast
    if cuda_available():
        return Precision("cuda", dtype, vae_dtype, upcast)
    if cpu_precision == "half":
        return Precision("cpu", dtype, vae_dtype, upcast)
    return Precision("cpu", torch.float32, torch.float32, upcast)


def cast(module: M, dtype: torch.dtype, device: str | None = None) -> M:
    """Move ``module`` (a torch module) to ``device`` (None: stay) and cast it to ``dtype``; the
    cast is skipped when every floating parameter already has ``dtype`` (diffusers 0.42 logs a
    "should be kept in float32" warning on every ``to(dtype)``, a no-op one too). Returns ``module``."""
    if device is not None:
        module.to(device)
    if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
        module.to(dtype=dtype)
    return module


def place(pipe: P, device: str) -> P:
    """Move a pipeline just loaded (on the CPU, where ``from_pretrained`` puts it) to ``device``;
    for ``"cpu"`` nothing moves, which also spares diffusers' warning that a float16 pipeline
    "cannot run" on the CPU (it can: see the module docstring). Returns ``pipe``."""
    if device != "cpu":
        pipe.to(device)
    return pipe


def generators(seed: int, count: int = 1) -> list[torch.Generator]:
    """``count`` CPU ``torch.Generator``\\ s seeded ``seed``, ``seed + 1``, … (image *i* of a
    request uses seed ``seed + i``): for a given dtype, the same noise on every device (module
    docstring; torch samples float16, bfloat16 and float32 noise differently, so a seed's image
    also depends on the dtype)."""
    import torch

    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]
