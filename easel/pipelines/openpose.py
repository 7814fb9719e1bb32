"""OpenPose body skeletons: the COCO-17 → OpenPose-18 keypoint conversion, the skeleton drawing the
openpose ControlNets were trained on, and the person box for a top-down pose estimator.

Easel estimates body keypoints with ViTPose (transformers' ``VitPoseForPoseEstimation``, see
:class:`easel.pipelines.conditions.OpenposeEstimator`), which predicts the 17 COCO keypoints. The
openpose ControlNets (``thibaud/controlnet-openpose-sdxl-1.0`` and the ControlNet 1.1 family) read
images drawn by ControlNet's ``draw_bodypose`` over the 18 OpenPose (COCO-18) keypoints, so:

- :func:`coco_to_openpose` maps COCO-17 to OpenPose-18 as controlnet_aux's DWPose annotator does:
  the OpenPose *neck* is the midpoint of the two shoulders, visible only when both are; a keypoint
  whose score is at most ``threshold`` (0.3, DWPose's) is left out.
- :func:`draw_bodypose` draws them as ControlNet 1.1's annotator (``annotator/openpose/util.py``,
  also ``controlnet_aux.open_pose.util.draw_bodypose``, which InstantID's demo calls): on a black
  canvas the 17 limbs of :data:`OPENPOSE_LIMBS` are filled ellipses of half-width 4 px
  (``ellipse2Poly`` with 1° steps, ``fillConvexPoly``) in the colours of :data:`OPENPOSE_COLORS`,
  the canvas is multiplied by 0.6 (the limbs' alpha: ControlNet 1.0 blended each limb at 0.6 with
  ``addWeighted``; on black both give 0.6 × colour), then each keypoint is a filled disc of
  radius 4 px in its own colour on top. Same integer truncation as the reference, so the pixels
  match it.

Coordinates are pixels, ``x`` right and ``y`` down; images are RGB.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

COCO_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
)
OPENPOSE_KEYPOINTS = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle", "right_eye", "left_eye",
    "right_ear", "left_ear",
)
NECK = 1
# OpenPose index → COCO index (the neck has none: it is the shoulders' midpoint)
OPENPOSE_FROM_COCO = tuple(None if name == "neck" else COCO_KEYPOINTS.index(name) for name in OPENPOSE_KEYPOINTS)
# The 17 limbs ControlNet draws (OpenPose's limbSeq without its two ear–shoulder pairs), 0-based,
# in drawing order; limb i has colour i.
OPENPOSE_LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)
# OpenPose's 18 colours (RGB): keypoint i and limb i
OPENPOSE_COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)
STICK_WIDTH = 4
JOINT_RADIUS = 4
LIMB_ALPHA = 0.6
KEYPOINT_THRESHOLD = 0.3


def coco_to_openpose(keypoints, scores, threshold: float = KEYPOINT_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """COCO-17 keypoints of one person → OpenPose-18 keypoints and their visibility.

    Args:
        keypoints: ``[17, 2]`` float ``(x, y)`` pixels in :data:`COCO_KEYPOINTS` order.
        scores: ``[17]`` confidences (ViTPose: heatmap peak values, about 0–1).
        threshold: a keypoint is visible when its score is above this (DWPose's 0.3).

    Returns:
        ``(points, visible)``: ``float64 [18, 2]`` in :data:`OPENPOSE_KEYPOINTS` order and ``bool
        [18]``. The neck is the midpoint of the shoulders, visible when both shoulders are.

    Raises:
        ValueError: shapes other than ``[17, 2]`` and ``[17]``.
    """
    keypoints = np.asarray(keypoints, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if keypoints.shape != (17, 2) or scores.shape != (17,):
        raise ValueError(f"COCO keypoints must be [17, 2] with [17] scores, got {keypoints.shape} and {scores.shape}")
    seen = scores > threshold
    points = np.zeros((18, 2))
    visible = np.zeros(18, dtype=bool)
    for op, coco in enumerate(OPENPOSE_FROM_COCO):
        if coco is not None:
            points[op], visible[op] = keypoints[coco], seen[coco]
    left, right = COCO_KEYPOINTS.index("left_shoulder"), COCO_KEYPOINTS.index("right_shoulder")
    points[NECK] = (keypoints[left] + keypoints[right]) / 2
    visible[NECK] = seen[left] and seen[right]
    return points, visible


def draw_bodypose(size: tuple[int, int], points, visible=None, stick_width: int = STICK_WIDTH,
                  joint_radius: int = JOINT_RADIUS):
    """Draw one or more OpenPose-18 skeletons the way the openpose ControlNets were trained to read them.

    Limbs first (filled ellipses along each of :data:`OPENPOSE_LIMBS` whose two ends are visible:
    centre the truncated midpoint, semi-axes ``(int(length / 2), stick_width)``, angle the
    truncated ``atan2`` in degrees), the whole canvas times 0.6 truncated to ``uint8``, then a
    disc of ``joint_radius`` at each visible keypoint (truncated coordinates). See the module
    docstring for the reference.

    Args:
        size: ``(width, height)`` of the output in pixels.
        points: ``[18, 2]`` (one person) or ``[n, 18, 2]`` float pixel coordinates.
        visible: ``[18]`` / ``[n, 18]`` booleans (default: all visible).

    Returns:
        RGB ``PIL.Image`` of ``size``: black where nothing is drawn.

    Raises:
        ValueError: points not shaped ``[18, 2]`` / ``[n, 18, 2]``.
    """
    import cv2
    from PIL import Image

    people = np.asarray(points, dtype=np.float64)
    if people.ndim == 2:
        people = people[None]
    if people.ndim != 3 or people.shape[1:] != (18, 2):
        raise ValueError(f"OpenPose keypoints must be [18, 2] or [n, 18, 2], got {np.shape(points)}")
    shown = np.ones(people.shape[:2], dtype=bool) if visible is None else np.asarray(visible, dtype=bool).reshape(people.shape[:2])
    width, height = size
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for i, (a, b) in enumerate(OPENPOSE_LIMBS):
        for person, seen in zip(people, shown):
            if not (seen[a] and seen[b]):
                continue
            (x0, y0), (x1, y1) = person[a], person[b]
            length = math.hypot(x0 - x1, y0 - y1)
            angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
            polygon = cv2.ellipse2Poly((int((x0 + x1) / 2), int((y0 + y1) / 2)), (int(length / 2), stick_width),
                                       int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, polygon, OPENPOSE_COLORS[i])
    canvas = (canvas * LIMB_ALPHA).astype(np.uint8)
    for i in range(18):
        for person, seen in zip(people, shown):
            if seen[i]:
                x, y = person[i]
                cv2.circle(canvas, (int(x), int(y)), joint_radius, OPENPOSE_COLORS[i], thickness=-1)
    return Image.fromarray(canvas)


def person_box(face_box: Sequence[float] | None, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The box a top-down pose estimator looks in, from the detected face (COCO ``x, y, w, h``).

    A body is about 7.5 head heights tall and, arms out, about as wide; so from a face box of
    width ``w`` and height ``h`` the person is taken to span 4 ``w`` either side of the face's
    centre, from ``h / 2`` above the face to 7 ``h`` below it, clipped to the image. For a
    portrait (the face a large part of the photo) that is the whole photo; in a wider scene it is
    the person whose face InstantID uses. Without a face: the whole image.

    Args:
        face_box: ``(x0, y0, x1, y1)`` pixels (insightface's ``Face.bbox``), or None.
        size: ``(width, height)`` of the image.

    Returns:
        ``(x, y, width, height)`` in pixels, inside the image, at least 1 × 1.
    """
    width, height = size
    if face_box is None:
        return 0.0, 0.0, float(width), float(height)
    x0, y0, x1, y1 = (float(v) for v in face_box[:4])
    w, h, cx = max(x1 - x0, 1.0), max(y1 - y0, 1.0), (x0 + x1) / 2
    left, right = max(0.0, cx - 4 * w), min(float(width), cx + 4 * w)
    top, bottom = max(0.0, y0 - h / 2), min(float(height), y1 + 7 * h)
    return left, top, max(right - left, 1.0), max(bottom - top, 1.0)
