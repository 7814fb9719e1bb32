"""ControlNet condition images derived from the input photo: canny edges, depth, openpose.

Follows InstantID's multi-ControlNet demo (``gradio_demo/controlnet_util.py`` of
``instantX-research/InstantID``): canny with OpenCV (thresholds 100/200 on the BGR image), depth
with transformers' ``DPTForDepthEstimation`` (the demo uses ``Intel/dpt-hybrid-midas``) min-max
normalised to 0–255 grey, and openpose with ``controlnet_aux``'s ``OpenposeDetector`` as the demo
(:mod:`easel.pipelines.openpose`). Estimators load from a local folder (a Hub snapshot or a placed
copy).
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np


class ConditionError(RuntimeError):
    """A condition extractor is unavailable (missing package or weights); the message says what to do."""


def _load_model(cls, path: str | Path, model_type: str, what: str):
    """``cls.from_pretrained(path)`` only if ``path`` holds a ``model_type`` model with every weight.

    transformers loads a checkpoint of another architecture, or with weights missing, with a
    warning and randomly initialised layers; an estimator would then draw noise. This refuses both.

    Raises:
        ConditionError: no config, another ``model_type``, or missing weights (named by ``what``).
    """
    import json

    config = Path(path) / "config.json"
    try:
        found = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        raise ConditionError(f"no {what} model in {path}: no readable config.json") from None
    if found != model_type:
        raise ConditionError(f"no {what} model in {path}: config.json has model_type {found!r}, not {model_type!r}")
    try:
        model, info = cls.from_pretrained(str(path), output_loading_info=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ConditionError(f"no {what} model in {path}: {str(exc).splitlines()[0][:200]}") from None
    if info.get("missing_keys"):
        raise ConditionError(f"the {what} model in {path} lacks weights, e.g. {sorted(info['missing_keys'])[:2]}")
    return model


def _where(device, dtype) -> tuple:
    """``(device, dtype)``: the given ones, else :func:`easel.weights.precision.precision`'s for
    kind ``condition``."""
    from easel.weights.precision import precision

    default = precision("condition")
    return device or default.device, dtype or default.dtype


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
        device, dtype: where to run (default: ``easel.weights.precision.precision("condition")``,
            CUDA float16 when available, else CPU float32).

    Raises:
        ConditionError: the folder does not hold a DPT depth model.
    """

    def __init__(self, path: str | Path, device: str | None = None, dtype=None):
        from transformers import AutoImageProcessor, DPTForDepthEstimation

        self.device, self.dtype = _where(device, dtype)
        self.model = _load_model(DPTForDepthEstimation, path, "dpt", "DPT depth").to(self.device, self.dtype).eval()
        try:
            self.processor = AutoImageProcessor.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise ConditionError(f"no DPT image processor in {path}: {str(exc).splitlines()[0][:200]}") from None
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


class OpenposeEstimator:
    """Every person's body pose as an OpenPose skeleton image, with ``controlnet_aux``'s
    ``OpenposeDetector`` called as InstantID's demo calls it (:mod:`easel.pipelines.openpose`).

    Args:
        path: local folder with ``body_pose_model.pth`` (a snapshot of ``lllyasviel/Annotators``).
        device: where to run (default: ``easel.weights.precision.precision("condition")``'s); the
            body network runs in float32 whatever ``dtype`` says, as the library builds its input.
        dtype: ignored (accepted as the other estimators').

    Raises:
        ConditionError: controlnet_aux is missing, or the folder holds no loadable body model.
    """

    def __init__(self, path: str | Path, device: str | None = None, dtype=None):
        from easel.pipelines.openpose import load_openpose

        self.device, _ = _where(device, dtype)
        self.detector = load_openpose(path, self.device)
        self.model = self.detector.body_estimation.model  # the body network (torch, float32)
        self._lock = threading.Lock()

    def __call__(self, image, size: tuple[int, int] | None = None):
        """Pose image of an RGB ``PIL.Image``: RGB, ``size`` (``(width, height)``, default the
        input's), every detected body drawn on black at 512 px and resized as the demo does."""
        from easel.pipelines.openpose import openpose_image

        with self._lock:
            return openpose_image(self.detector, image, size)
