"""Easel's InstantID equals the demos' own pipeline (``pipeline_stable_diffusion_xl_instantid_full.py``
of ``instantX-research/InstantID``) on the tiny weights: IdentityNet alone and with openpose, depth
and canny ControlNets, each with and without the face-region mask. The reference's outputs are in
``tests/data/instantid_full.npz`` (``tests/data/README.md`` says how they were made)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

DATA = Path(__file__).parent / "data" / "instantid_full.npz"
# the reference run's settings (tests/data/README.md)
SIZE, STEPS, SEED, CFG = 64, 3, 42, 5.0
PROMPT = "a (photo:1.3) of a [smiling] person, (detailed skin:1.1), soft light"
NEG = "(blurry:1.2), lowres, [bad anatomy]"
IP, ID_SCALE, EXTRA = 0.8, 0.8, {"openpose": 0.4, "depth": 0.5, "canny": 0.6}
TOLERANCE = 1e-4  # of the [0, 1] output; the CPU float32 runs agree to ~1e-6


@pytest.fixture(scope="module")
def golden():
    with np.load(DATA) as data:
        return dict(data)


@pytest.fixture(scope="module")
def easel_pipe(tiny):
    from diffusers import StableDiffusionXLPipeline

    from easel.pipelines.instantid import InstantIDAdapter, load_controlnet

    base = StableDiffusionXLPipeline.from_pretrained(str(tiny["sdxl"]))
    adapter = InstantIDAdapter.load(tiny["instantid-ip-adapter"])
    adapter.attach(base.unet)
    nets = {name: load_controlnet(tiny[f"sdxl-controlnet-{name}"]) for name in ("identitynet", *EXTRA)}
    return base, adapter, nets


@pytest.mark.parametrize("multi", [False, True], ids=["identitynet", "identitynet+openpose+depth+canny"])
@pytest.mark.parametrize("masked", [False, True], ids=["whole-image", "face-region"])
def test_instantid_equals_the_reference_full_pipeline(easel_pipe, golden, multi, masked):
    from easel.pipelines.instantid import build_pipeline, draw_kps, face_box_mask, generate

    base, adapter, nets = easel_pipe
    kps = draw_kps((SIZE, SIZE), [[22, 26], [42, 26], [32, 36], [24, 46], [40, 46]])
    assert np.array_equal(np.asarray(kps), golden["kps"])  # the reference's keypoint image
    extra = list(EXTRA) if multi else []
    pipe = build_pipeline(base, nets["identitynet"], [nets[n] for n in extra])
    images = [kps] + [Image.fromarray(golden[f"cond_{n}"]) for n in extra]
    scales = [ID_SCALE] + [EXTRA[n] for n in extra]
    out = generate(pipe, adapter, golden["emb"], images, scales, IP, PROMPT, NEG, num_inference_steps=STEPS,
                   guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED), width=SIZE, height=SIZE,
                   output_type="np", face_mask=face_box_mask((SIZE, SIZE), golden["box"]) if masked else None).images[0]
    expected = golden[f"{'multi' if multi else 'single'}_{'masked' if masked else 'unmasked'}"]
    assert out.shape == expected.shape == (SIZE, SIZE, 3)
    assert np.abs(out - expected).max() < TOLERANCE


def test_the_golden_cases_differ_from_each_other(golden):
    """Each case is a real check: masking and the extra ControlNets change the reference's output
    by far more than the tolerance."""
    cases = ["single_unmasked", "single_masked", "multi_unmasked", "multi_masked"]
    for i, a in enumerate(cases):
        for b in cases[i + 1:]:
            assert np.abs(golden[a] - golden[b]).max() > 100 * TOLERANCE, (a, b)
