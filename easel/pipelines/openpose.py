"""OpenPose body skeletons with ``controlnet_aux``'s ``OpenposeDetector``, as InstantID's demo draws them.

InstantID's multi-ControlNet demo (``gradio_demo/controlnet_util.py`` and
``app-multicontrolnet.py`` of ``instantX-research/InstantID``) makes the openpose condition with
``OpenposeDetector.from_pretrained("lllyasviel/ControlNet")`` called with its defaults (every
person's body, no hands, no face; detected and drawn at 512 px on the short side) and resized
to the generation size with PIL's default resampling. :func:`load_openpose` builds the same
detector from the body network's weights (``body_pose_model.pth`` of ``lllyasviel/Annotators``,
catalog id ``openpose-annotators``); :func:`openpose_image` is the demo's call.

``controlnet_aux``'s package ``__init__`` imports every annotator it has (so timm and
torchvision), and its ``open_pose/face.py`` imports ``torchvision.transforms``.
The body network needs neither: torch, OpenCV, SciPy and scikit-image. On a CPU torch there is
no matching torchvision wheel (PyPI's are CUDA builds, whose ``_C`` needs ``libtorch_cuda``), so
Easel installs ``controlnet-aux`` without its dependencies (``scripts/setup.sh``; the
``openpose`` extra of ``pyproject.toml`` for a GPU box) and :func:`open_pose_module` imports
``controlnet_aux.open_pose`` without running the package ``__init__`` (``controlnet_aux`` is then
a bare package object in ``sys.modules``: ``from controlnet_aux import CannyDetector`` fails in
that process); where torchvision does not import, the face estimator (never used by the demo's
call) is replaced by one that refuses. The detector code, the network and the drawing are the
library's own.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from pathlib import Path

from easel.pipelines.conditions import ConditionError

BODY_FILE = "body_pose_model.pth"
DETECT_RESOLUTION = 512  # OpenposeDetector.__call__'s defaults, which the demo keeps
IMAGE_RESOLUTION = 512
_lock = threading.Lock()


class OpenposeUnavailable(ConditionError):
    """``controlnet_aux`` is not installed or its open_pose module does not import."""


def open_pose_module():
    """``controlnet_aux.open_pose``, imported without ``controlnet_aux/__init__.py``.

    Returns:
        the module (``OpenposeDetector``, ``Body``, ``Hand``, ``draw_poses``, ...).

    Raises:
        OpenposeUnavailable: ``controlnet_aux`` is not installed (the message says how to install it).
    """
    with _lock:
        loaded = sys.modules.get("controlnet_aux.open_pose")
        if loaded is not None:
            return loaded
        spec = importlib.util.find_spec("controlnet_aux") if "controlnet_aux" not in sys.modules else None
        if spec is None and "controlnet_aux" not in sys.modules:
            raise OpenposeUnavailable("openpose needs controlnet_aux: pip install --no-deps 'controlnet-aux>=0.0.10' "
                                      "scikit-image (scripts/setup.sh does)")
        if spec is not None:  # a bare package object: its submodules import, its __init__ does not run
            package = types.ModuleType("controlnet_aux")
            package.__path__ = list(spec.submodule_search_locations)
            package.__spec__ = spec
            package.__file__ = spec.origin
            sys.modules["controlnet_aux"] = package
        if "controlnet_aux.open_pose.face" not in sys.modules:
            try:
                importlib.import_module("torchvision.transforms")
            except Exception:  # absent, or a CUDA build beside a CPU torch (RuntimeError)
                sys.modules["controlnet_aux.open_pose.face"] = _face_stub()
        try:
            return importlib.import_module("controlnet_aux.open_pose")
        except ImportError as exc:
            raise OpenposeUnavailable(f"controlnet_aux's open_pose does not import: {exc}") from None


def _face_stub() -> types.ModuleType:
    """Stands in for ``controlnet_aux.open_pose.face`` where torchvision does not import."""
    module = types.ModuleType("controlnet_aux.open_pose.face")

    class Face:
        """OpenPose's face estimator needs torchvision, which does not import here."""

        def __init__(self, *args, **kwargs):
            raise OpenposeUnavailable("controlnet_aux's face estimator needs torchvision, which does not import")

    module.Face = Face
    return module


def load_openpose(folder: str | Path, device: str = "cpu"):
    """``OpenposeDetector`` with the body network of ``folder/body_pose_model.pth`` (no hand or face
    estimators: the demo's call uses neither).

    Args:
        folder: a snapshot of ``lllyasviel/Annotators`` (at least ``body_pose_model.pth``: a torch
            state dict of ``bodypose_model`` without its first name component, 52 M float32).
        device: torch device for the network (the body network runs in float32, as the library's).

    Raises:
        OpenposeUnavailable: controlnet_aux missing, or no/unloadable ``body_pose_model.pth``.
    """
    module = open_pose_module()
    path = Path(folder) / BODY_FILE
    if not path.is_file():
        raise OpenposeUnavailable(f"no OpenPose body model in {folder}: {BODY_FILE} is missing")
    try:
        body = module.Body(str(path))
    except (RuntimeError, KeyError, OSError, EOFError) as exc:  # wrong keys/shapes, not a state dict
        raise OpenposeUnavailable(f"{path} is not an OpenPose body model: {str(exc).splitlines()[0][:200]}") from None
    body.to(device)
    return module.OpenposeDetector(body)


def openpose_image(detector, image, size: tuple[int, int] | None = None):
    """The demo's openpose condition: ``detector(image).resize(size)``.

    Args:
        detector: from :func:`load_openpose` (or ``controlnet_aux.OpenposeDetector``).
        image: RGB ``PIL.Image``.
        size: ``(width, height)`` of the result (default the input's), resized with PIL's default
            (bicubic) as the demo's ``.resize((width, height))``.

    Returns:
        RGB ``PIL.Image``: every detected person's body skeleton on black.
    """
    pose = detector(image.convert("RGB"), detect_resolution=DETECT_RESOLUTION, image_resolution=IMAGE_RESOLUTION)
    return pose.resize(size or image.size)
