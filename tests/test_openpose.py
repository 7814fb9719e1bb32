"""Openpose conditions: controlnet_aux's OpenposeDetector as InstantID's demo calls it, on the tiny
``body_pose_model.pth`` (real keys and shapes, expanded small random weights)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


def _photo(seed: int, size=(120, 160)) -> Image.Image:
    """Random blocks, upsampled: the tiny body network finds several "people" in it."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)).resize(size)


def test_the_tiny_body_model_has_the_real_keys_and_shapes_and_is_small(tiny):
    import torch

    from easel.pipelines.openpose import open_pose_module

    path = tiny["pose-openpose"] / "body_pose_model.pth"
    assert path.stat().st_size < 5_000_000  # the real file: 209 MB
    state = torch.load(str(path), weights_only=True)  # a plain state dict, as the Hub's
    module = open_pose_module()
    model = __import__(module.__name__ + ".model", fromlist=["bodypose_model"]).bodypose_model()
    expected = {".".join(k.split(".")[1:]): v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in state.items()} == expected
    assert len(expected) == 184 and expected["conv1_1.weight"] == (64, 3, 3, 3)
    assert expected["Mconv7_stage6_L2.weight"] == (19, 128, 1, 1)  # 18 parts + background
    # the library's own loader takes it (util.transfer: adds the block names back)
    module.Body(str(path))


def test_the_openpose_condition_equals_controlnet_aux_openposedetector(tiny):
    """InstantID's demo: ``OpenposeDetector.from_pretrained(...)(img).resize((width, height))``."""
    from controlnet_aux.open_pose import Body, OpenposeDetector

    from easel.pipelines.conditions import OpenposeEstimator

    folder = tiny["pose-openpose"]
    photo = _photo(3)
    ours = np.asarray(OpenposeEstimator(folder, device="cpu")(photo, size=(96, 112)))
    reference = OpenposeDetector(Body(str(folder / "body_pose_model.pth")))
    expected = np.asarray(reference(photo).resize((96, 112)))
    assert ours.shape == (112, 96, 3) and ours.dtype == np.uint8
    assert np.array_equal(ours, expected)
    # not a trivial (black) image: the detector found people and drew limbs in several colours
    assert (ours > 0).any(axis=-1).mean() > 0.05 and len({tuple(c) for c in ours.reshape(-1, 3)}) > 10
    # drawn at 512 on the short side, then resized: the default size is the input's
    assert OpenposeEstimator(folder, device="cpu")(photo).size == photo.size


def test_openpose_refuses_a_folder_without_a_body_model(tiny, tmp_path):
    import torch

    from easel.pipelines.conditions import ConditionError, OpenposeEstimator

    with pytest.raises(ConditionError, match="body_pose_model.pth is missing"):
        OpenposeEstimator(tiny["depth-dpt"], device="cpu")  # a DPT folder is not a pose model
    torch.save({"conv1_1.weight": torch.zeros(64, 3, 3, 3)}, str(tmp_path / "body_pose_model.pth"))
    with pytest.raises(ConditionError, match="is not an OpenPose body model"):
        OpenposeEstimator(tmp_path, device="cpu")


def test_without_controlnet_aux_openpose_says_how_to_install_it(tiny):
    import subprocess
    import sys

    script = f"""
import importlib.util
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "controlnet_aux" else real(name, *a)
from easel.pipelines.conditions import ConditionError, OpenposeEstimator
try:
    OpenposeEstimator({str(tiny["pose-openpose"])!r}, device="cpu")
except ConditionError as exc:
    print("refused:", exc)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "refused: openpose needs controlnet_aux: pip install --no-deps 'controlnet-aux" in out.stdout
