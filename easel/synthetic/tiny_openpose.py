"""A tiny OpenPose body model in the on-disk format of ``lllyasviel/Annotators``' ``body_pose_model.pth``.

The real file is a torch pickle of a plain state dict (209 MB): the parameters of
``controlnet_aux.open_pose.model.bodypose_model`` keyed without their first name component
(``conv1_1.weight``, ``Mconv7_stage6_L2.bias``; ``Body`` maps them back with
``open_pose.util.transfer``). That network's channel counts are fixed in its code, so a file with
fewer channels would not load. This writer keeps every real key and shape but stores each weight
as a small random tensor *expanded* along its input-channel axis (stride 0): ``torch.save``
writes only the small storage, ``torch.load`` rebuilds the full-shape view, and
``load_state_dict`` copies it into the real network (small layers, up to 65 536 weights, are
stored whole). The file is about 3 MB; the network it loads is the real one, running the real
detector code (peaks, part affinity fields, drawing).

The weights are scaled (He initialisation; an expanded layer divided by its input channels, which
it sums with one weight) and the last stage's outputs set (:func:`write_tiny_openpose`) so that
random photos give peaks and limbs: a detector that finds nobody would make every comparison
trivially equal (black images).
"""
from __future__ import annotations

from pathlib import Path

BODY_FILE = "body_pose_model.pth"
FULL_LIMIT = 1 << 16  # layers up to this many weights are stored whole


def write_tiny_openpose(folder: Path, seed: int = 61, heat_gain: float = 2.0, heat_bias: float = 0.1, paf: float = 0.7) -> Path:
    """Write ``folder/body_pose_model.pth`` (real keys and shapes, expanded small weights).

    Args:
        folder: created if missing.
        seed: torch seed of the random weights.
        heat_gain: multiplies the last stage's heatmap layer (``Mconv7_stage6_L2``), so that
            peaks pass the detector's 0.1 threshold.
        heat_bias: that layer's bias (every part channel above the threshold somewhere).
        paf: the last stage's part affinity fields (``Mconv7_stage6_L1``: zero weights, this
            bias): every limb's field points down and right, so parts down-right of each other
            connect into people (random fields almost never pass the detector's 80 % test).

    Returns:
        ``folder``.

    Raises:
        easel.pipelines.openpose.OpenposeUnavailable: controlnet_aux is not installed (its network
            class gives the keys and shapes).
    """
    import torch

    from easel.pipelines.openpose import open_pose_module

    model_module = __import__(open_pose_module().__name__ + ".model", fromlist=["bodypose_model"])
    shapes = {k: v.shape for k, v in model_module.bodypose_model().state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        name = ".".join(key.split(".")[1:])  # the file's keys: without "model0." / "model1_1." ...
        if len(shape) == 4:
            out_ch, in_ch, kh, kw = shape
            gain = {"Mconv7_stage6_L2": heat_gain, "Mconv7_stage6_L1": 0.0}.get(name.split(".")[0], 1.0)
            if out_ch * in_ch * kh * kw <= FULL_LIMIT:  # small layers (the 1×1 ones, conv1_1): whole
                state[name] = torch.randn(shape, generator=generator) * gain * (2.0 / (in_ch * kh * kw)) ** 0.5
            else:  # one weight for all input channels, which are then summed: scale 1 / fan
                small = torch.randn(out_ch, 1, kh, kw, generator=generator) * gain * (2.0 / (kh * kw)) ** 0.5 / in_ch
                state[name] = small.expand(out_ch, in_ch, kh, kw)
        elif name == "Mconv7_stage6_L2.bias":
            state[name] = torch.full(shape, heat_bias)
        elif name == "Mconv7_stage6_L1.bias":
            state[name] = torch.full(shape, paf)
        else:  # biases
            state[name] = torch.randn(shape, generator=generator) * 0.05
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, str(folder / BODY_FILE))
    return folder
