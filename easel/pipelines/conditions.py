"""ControlNet condition images derived from the input photo: canny edges, depth, openpose.

Follows InstantID's multi-ControlNet demo (``gradio_demo/controlnet_util.py`` of
``instantX-research/InstantID``): canny with OpenCV (thresholds 100/200 on the BGR image), depth
with transformers' ``DPTForDepthEstimation`` (the demo uses ``Intel/dpt-hybrid-midas``) min-max
normalised to 0–255 grey. Openpose: the demo uses ``controlnet_aux``'s ``OpenposeDetector``;
Easel uses transformers' ViTPose (``usyd-community/vitpose-base-simple``) and draws its keypoints
as OpenPose skeletons (:mod:`easel.pipelines.openpose`), because controlnet_aux pulls torchvision,
timm and a CUDA torch. Estimators load from a local folder (a Hub snapshot or a placed copy).
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
    """Body pose as an OpenPose skeleton image, with ViTPose (transformers' ``VitPoseForPoseEstimation``).

    ViTPose (Xu et al., arXiv 2204.12484) is a *top-down* estimator: it finds the 17 COCO
    keypoints of the one person inside a given box (the crop is the box padded by 1.25 at the
    model's 3:4 aspect, affine-warped to its input size; keypoints are decoded from heatmaps with
    DARK sub-pixel refinement, all by transformers' ``VitPoseImageProcessorPil``). The keypoints
    are converted to OpenPose-18 and drawn as the openpose ControlNets were trained to read them
    (:mod:`easel.pipelines.openpose`). InstantID's demo runs controlnet_aux's OpenPose body network
    instead; that package pulls torchvision, timm and a CUDA torch, which Easel does not install,
    while transformers (already a dependency) carries ViTPose.

    Args:
        path: local folder with ``config.json``, ``model.safetensors`` and
            ``preprocessor_config.json`` (a snapshot of ``usyd-community/vitpose-base-simple``).
        device, dtype: where to run (default: ``easel.weights.precision.precision("condition")``,
            CUDA float16 when available, else CPU float32).

    Raises:
        ConditionError: the folder does not hold a ViTPose model.
    """

    def __init__(self, path: str | Path, device: str | None = None, dtype=None):
        from transformers import VitPoseForPoseEstimation
        from transformers.models.vitpose.image_processing_pil_vitpose import VitPoseImageProcessorPil

        self.device, self.dtype = _where(device, dtype)
        self.model = _load_model(VitPoseForPoseEstimation, path, "vitpose", "ViTPose").to(self.device, self.dtype).eval()
        try:  # the PIL/NumPy/SciPy processor: the default one needs torchvision
            self.processor = VitPoseImageProcessorPil.from_pretrained(str(path))
        except (OSError, ValueError, TypeError) as exc:
            raise ConditionError(f"no ViTPose image processor in {path}: {str(exc).splitlines()[0][:200]}") from None
        if self.model.config.num_labels != 17:
            raise ConditionError(f"{path}: a ViTPose model with {self.model.config.num_labels} keypoints; "
                                 "the openpose condition needs the 17 COCO body keypoints")
        self._lock = threading.Lock()

    def keypoints(self, image, box: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray]:
        """COCO-17 keypoints of the person in ``box`` (``x, y, width, height`` pixels) of an RGB
        ``PIL.Image``: ``(float32 [17, 2] pixels, float32 [17] scores)``."""
        import torch

        boxes = [[list(map(float, box))]]
        inputs = self.processor(images=image.convert("RGB"), boxes=boxes, return_tensors="pt")
        with self._lock, torch.no_grad():
            out = self.model(inputs.pixel_values.to(self.device, self.dtype))
        out.heatmaps = out.heatmaps.float()
        pose = self.processor.post_process_pose_estimation(out, boxes=boxes)[0][0]
        return pose["keypoints"].numpy().astype(np.float32), pose["scores"].numpy().astype(np.float32).reshape(-1)

    def __call__(self, image, size: tuple[int, int] | None = None, face_box=None):
        """Pose image of an RGB ``PIL.Image``: an RGB image of ``size`` (``(width, height)``,
        default the input's) with the OpenPose skeleton of the person around ``face_box``
        (``(x0, y0, x1, y1)``, see :func:`easel.pipelines.openpose.person_box`; None: the whole image)
        on black. Keypoints scored at most 0.3 are left out."""
        from easel.pipelines.openpose import coco_to_openpose, draw_bodypose, person_box

        keypoints, scores = self.keypoints(image, person_box(face_box, image.size))
        points, visible = coco_to_openpose(keypoints, scores)
        width, height = size or image.size
        points = points * np.array([width / image.size[0], height / image.size[1]])
        return draw_bodypose((width, height), points, visible)
