"""Face analysis for InstantID: detection, five keypoints and the 512-d identity embedding, with
insightface's ``FaceAnalysis`` over the ``antelopev2`` ONNX pack (ONNX Runtime), as the
InstantID reference does (``FaceAnalysis(name="antelopev2", root=...)``,
``prepare(det_size=(640, 640))``, the largest face by box area).

insightface's pretrained models are licensed for non-commercial research use only: in hub mode
Easel fetches the pack from the catalog's ``antelopev2`` source only after the operator accepted
that licence (``easel.weights.sources.ModelSources.face_root``); or the operator places the files
by hand (see :data:`PLACEMENT` and docs/models.md). Offline tests use the tiny stand-ins of
``easel.synthetic.tiny_faces`` (same file names and tensor layout).
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PACK = "antelopev2"
REQUIRED = ("scrfd_10g_bnkps.onnx", "glintr100.onnx")
PLACEMENT = (
    "InstantID needs insightface's antelopev2 face-analysis pack, whose licence allows non-commercial "
    "research use only. With --model-source hub Easel fetches it once the operator accepted that licence "
    "(EASEL_ACCEPT_LICENSES=antelopev2); or place scrfd_10g_bnkps.onnx (detector) and glintr100.onnx "
    "(recogniser) from antelopev2 in {folder} (a symlink to a shared copy works); see docs/models.md.")


class FacePackMissing(RuntimeError):
    """The antelopev2 pack is not where it must be placed; the message says where and why."""


class NoFaceError(ValueError):
    """No face was found in the image; the message contains ``no face detected``."""


@dataclass(frozen=True)
class FaceInfo:
    """One detected face.

    Attributes:
        bbox: ``float32 [4]`` ``x0, y0, x1, y1`` in pixels of the analysed image.
        kps: ``float32 [5, 2]`` keypoints (left eye, right eye, nose, left and right mouth corner), pixels.
        embedding: ``float32 [512]`` identity embedding (unnormalised, as InstantID uses it).
        score: detection score in [0, 1].
    """

    bbox: np.ndarray
    kps: np.ndarray
    embedding: np.ndarray
    score: float

    @property
    def area(self) -> float:
        return float(max(0.0, self.bbox[2] - self.bbox[0]) * max(0.0, self.bbox[3] - self.bbox[1]))


def pack_folder(root: str | Path) -> Path:
    """``<root>/models/antelopev2``: where insightface's ``FaceAnalysis(name="antelopev2", root=root)`` looks."""
    return Path(root) / "models" / PACK


def check_pack(root: str | Path) -> Path:
    """The pack folder, if it holds the required files.

    Raises:
        FacePackMissing: naming the folder, the files and the licence reason.
    """
    folder = pack_folder(root)
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise FacePackMissing(f"missing {', '.join(missing)} in {folder}. " + PLACEMENT.format(folder=folder))
    return folder


class FaceAnalyzer:
    """insightface ``FaceAnalysis`` (detection + recognition only) over a placed antelopev2 pack.

    Thread-safe (one analysis at a time per instance; ONNX Runtime sessions are reused).

    Args:
        root: folder containing ``models/antelopev2/``.
        providers: ONNX Runtime execution providers; default CUDA when available, else CPU.
        det_size: detector input size ``(width, height)``; the reference uses 640×640.

    Raises:
        FacePackMissing: the pack is not placed.
    """

    def __init__(self, root: str | Path, providers: list[str] | None = None, det_size: tuple[int, int] = (640, 640)):
        check_pack(root)
        import onnxruntime
        from insightface.app import FaceAnalysis

        if providers is None:
            available = onnxruntime.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.providers = providers
        self._app = FaceAnalysis(name=PACK, root=str(root), providers=providers,
                                 allowed_modules=["detection", "recognition"])
        if "recognition" not in self._app.models:
            raise FacePackMissing(f"no recognition model was recognised in {pack_folder(root)}. "
                                  + PLACEMENT.format(folder=pack_folder(root)))
        ctx = 0 if providers and providers[0] == "CUDAExecutionProvider" else -1
        self._app.prepare(ctx_id=ctx, det_size=det_size)
        self._lock = threading.Lock()

    def faces(self, image) -> list[FaceInfo]:
        """All faces in an RGB image (``PIL.Image`` or ``uint8 [H, W, 3]`` RGB array), largest first."""
        import cv2

        rgb = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)  # insightface takes OpenCV's BGR order
        with self._lock, warnings.catch_warnings():
            # insightface 0.7.3 calls scikit-image's deprecated SimilarityTransform.estimate on every
            # face: a library-internal FutureWarning that would otherwise reach each task's debugerror
            warnings.filterwarnings("ignore", message=".*`estimate` is deprecated", category=FutureWarning,
                                    module=r"insightface\.")
            found = self._app.get(bgr)
        faces = [FaceInfo(np.asarray(f.bbox, np.float32), np.asarray(f.kps, np.float32),
                          np.asarray(f.embedding, np.float32), float(f.det_score)) for f in found]
        return sorted(faces, key=lambda f: f.area, reverse=True)

    def largest_face(self, image, field: str = "inputImageUrl",
                     original_size: tuple[int, int] | None = None) -> FaceInfo:
        """The largest face (box area), as InstantID uses.

        Args:
            image: RGB ``PIL.Image`` or uint8 ``[H, W, 3]`` array, the image analysed.
            original_size: ``(width, height)`` of the user's image when ``image`` is a resized copy
                of it; the error message reports that size (the one the user knows), and the
                analysed size after it.

        Raises:
            NoFaceError: ``"no face detected in <field> (<W>x<H> image...): ..."``.
        """
        faces = self.faces(image)
        if not faces:
            w, h = image.size if hasattr(image, "size") else (image.shape[1], image.shape[0])
            size = f"{w}x{h} image"
            if original_size is not None and tuple(original_size) != (w, h):
                size = f"{original_size[0]}x{original_size[1]} image, analysed at {w}x{h}"
            raise NoFaceError(f"no face detected in {field} ({size}): InstantID needs a photo with a "
                              "clearly visible face")
        return faces[0]
