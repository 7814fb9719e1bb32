"""ControlNet condition images derived from the input photo: canny edges, depth, openpose.

Follows InstantID's multi-ControlNet demo (``gradio_demo/controlnet_util.py`` of
``instantX-research/InstantID``): canny with OpenCV (thresholds 100/200 on the BGR image), depth
with transformers' ``DPTForDepthEstimation`` (the demo uses ``Intel/dpt-hybrid-midas``) min-max
normalised to 0–255 grey, openpose with ``controlnet_aux``'s ``OpenposeDetector``
(``lllyasviel/Annotators``). Estimators load from a local folder (a Hub snapshot or a placed copy).

``controlnet_aux`` is optional: it pulls torchvision and timm (and on PyPI a CUDA torch), so Easel
does not install it by default; without it openpose fails with :class:`ConditionError` saying how
to install it. Depth and canny need only transformers and OpenCV.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np


class ConditionError(RuntimeError):
    """A condition extractor is unavailable (missing package or weights); the message says what to do."""


def canny_condition(image, low: int = 100, high: int = 200):
    """Canny edges of an RGB ``PIL.Image`` as an ``L`` image of the same size (0 or 255).

    Same call as the reference: ``cv2.Canny`` on the image converted to BGR, thresholds 100/200.
    """
    import cv2
    from PIL import Image

    bgr = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR)
    return Image.fromarray(cv2.Canny(bgr, low, high), "L")


class DepthEstimator:
    """Monocular depth with a transformers DPT model (``DPTForDepthEstimation`` + its image processor).

    Args:
        path: local folder with ``config.json``, weights and ``preprocessor_config.json``
            (e.g. a snapshot of ``Intel/dpt-hybrid-midas``).
        device, dtype: where to run (default: CUDA fp16 when available, else CPU fp32).

    Raises:
        ConditionError: the folder does not hold a DPT depth model.
    """

    def __init__(self, path: str | Path, device: str | None = None, dtype=None):
        import torch
        from transformers import AutoImageProcessor, DPTForDepthEstimation

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype or (torch.float16 if self.device == "cuda" else torch.float32)
        try:
            self.processor = AutoImageProcessor.from_pretrained(str(path))
            self.model = DPTForDepthEstimation.from_pretrained(str(path)).to(self.device, self.dtype).eval()
        except (OSError, ValueError) as exc:
            raise ConditionError(f"no DPT depth model in {path}: {str(exc).splitlines()[0][:200]}") from None
        self._lock = threading.Lock()

    def __call__(self, image, size: tuple[int, int] | None = None):
        """Depth map of an RGB ``PIL.Image``: RGB image (grey, near = bright as MiDaS) of ``size``
        (``(width, height)``; default the input's), min-max normalised to 0–255 as the reference."""
        import torch
        from PIL import Image

        width, height = size or image.size
        pixels = self.processor(images=image.convert("RGB"), return_tensors="pt").pixel_values
        with self._lock, torch.no_grad():
            depth = self.model(pixels.to(self.device, self.dtype)).predicted_depth.float()
        depth = torch.nn.functional.interpolate(depth.unsqueeze(1), size=(height, width), mode="bicubic",
                                                align_corners=False)[0, 0]
        lo, hi = depth.min(), depth.max()
        depth = (depth - lo) / (hi - lo) if float(hi - lo) > 0 else torch.zeros_like(depth)
        grey = (depth.cpu().numpy() * 255.0).clip(0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey] * 3, axis=-1))


OPENPOSE_MISSING = (
    "the openpose ControlNet needs the controlnet_aux package, which Easel does not install by default "
    "(it pulls torchvision and timm): install it with `pip install controlnet_aux` in Easel's "
    "environment, matching your torch build")


def require_openpose() -> None:
    """Raise :class:`ConditionError` (saying how to install it) unless controlnet_aux is importable."""
    import importlib.util

    if importlib.util.find_spec("controlnet_aux") is None:
        raise ConditionError(OPENPOSE_MISSING)


class OpenposeEstimator:
    """Body pose skeleton with ``controlnet_aux.OpenposeDetector`` (from ``lllyasviel/Annotators``).

    Args:
        path: local folder holding ``body_pose_model.pth`` (and optionally hand/face models), e.g. a
            snapshot of ``lllyasviel/Annotators``. Those ``.pth`` files are torch pickles loaded by
            controlnet_aux; only point this at a trusted, pinned source.

    Raises:
        ConditionError: controlnet_aux is not installed, or the weights are missing.
    """

    def __init__(self, path: str | Path, device: str | None = None):
        require_openpose()
        try:
            from controlnet_aux import OpenposeDetector
        except ImportError as exc:
            raise ConditionError(f"{OPENPOSE_MISSING} (import failed: {exc})") from None
        import torch

        if not (Path(path) / "body_pose_model.pth").is_file():
            raise ConditionError(f"no body_pose_model.pth in {path} (a snapshot of lllyasviel/Annotators)")
        self.detector = OpenposeDetector.from_pretrained(str(path))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.detector.to(self.device)
        self._lock = threading.Lock()

    def __call__(self, image, size: tuple[int, int] | None = None):
        """Pose image (RGB ``PIL.Image`` of ``size``, default the input's) of an RGB ``PIL.Image``."""
        width, height = size or image.size
        with self._lock:
            pose = self.detector(image.convert("RGB"))
        return pose.convert("RGB").resize((width, height))
