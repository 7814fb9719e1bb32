"""Prompt weighting and long prompts (``easel.pipelines.prompts``): the A1111 syntax, InstantID's
``_full`` encoding against the reference's own numbers (``tests/data/instantid_full_prompts.npz``,
see ``tests/data/README.md``), SD 1.5's A1111 weighting with clip skip, and the plain path left
to diffusers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"
SEED_TOOL = Path(__file__).parents[1] / "easel/catalog/tools/wiro__instant-id-controlnet-lora.json"


def _seed_defaults():
    return {i["name"]: i["default"] for i in json.loads(SEED_TOOL.read_text())["inputs"]}


# the cases the golden file was made with (tests/data/README.md)
CASES = {
    "seed": (_seed_defaults()["prompt"], _seed_defaults()["negativePrompt"]),
    "weighted": ("a (red:1.5) [cat] on ((a mat)), \\(literal\\)", "blurry"),
    "long": (" ".join(["a very long prompt about a (portrait:0.8) photo"] * 3), "(worst quality:1.4)"),
}


@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    ("", [("", 1.0)]),
])
def test_a1111_attention_syntax(text, expected):
    """A1111's documented examples of ``parse_prompt_attention``."""
    from easel.pipelines.prompts import parse_prompt_attention

    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert np.allclose([w for _, w in got], [w for _, w in expected], rtol=1e-12)


@pytest.fixture(scope="module")
def sdxl(tiny):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(tiny["sdxl"]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_instantid_encoding_equals_the_full_pipelines_numbers(sdxl, case):
    """Weighted and long prompts (the seed's own default negative prompt is both) give the
    embeddings InstantID's ``LongPromptWeight.get_weighted_text_embeddings_sdxl`` computed on
    the same tiny SDXL (float32, CPU; tolerance 1e-5 for BLAS summation order)."""
    from easel.pipelines.prompts import encode_sdxl, needs_weighting

    golden = np.load(DATA / "instantid_full_prompts.npz")
    prompt, negative = CASES[case]
    assert needs_weighting(sdxl.tokenizer, prompt, negative)
    for name, got in zip(("pe", "npe", "pooled", "npooled"), encode_sdxl(sdxl, prompt, negative)):
        expected = golden[f"{case}_{name}"]
        assert got.shape == expected.shape, name
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-5, err_msg=name)


def test_a_plain_short_prompt_is_left_to_diffusers(sdxl):
    from easel.pipelines.prompts import needs_weighting

    assert not needs_weighting(sdxl.tokenizer, "a portrait, best quality", "blurry")
    assert not needs_weighting(sdxl.tokenizer, "", "")
    assert needs_weighting(sdxl.tokenizer, "a (portrait:1.2)", "")
    assert needs_weighting(sdxl.tokenizer, "a portrait", "[blurry]")
    assert needs_weighting(sdxl.tokenizer, "word " * 80, "")  # beyond one 75-token chunk


@pytest.fixture(scope="module")
def sd15(tiny):
    from easel.weights.sources import Weights
    from easel.tools.sd_lora import read_pipeline

    return read_pipeline(Weights("diffusers", tiny["sd15"]), torch.float32)


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_sd15_weighting_is_a1111s(sd15, clip_skip):
    """A weight scales its tokens' embeddings, then the chunk is rescaled to the unweighted mean
    (A1111's ``z · w · mean / mean_w``); an unweighted prompt in one chunk equals Easel's plain
    encoding (diffusers' 77 tokens, with clip skip); long prompts are chunks of 77."""
    from easel.pipelines.prompts import encode_sd15
    from easel.tools.sd_lora import encode_prompt

    plain = encode_prompt(sd15, ["a red cat"], clip_skip)
    pe, npe = encode_sd15(sd15, "a red cat", "", clip_skip)
    assert torch.equal(pe, plain) and torch.equal(npe, encode_prompt(sd15, [""], clip_skip))
    weighted, _ = encode_sd15(sd15, "a (red:1.5) cat", "", clip_skip)
    ids = sd15.tokenizer("a red cat").input_ids
    red = len(sd15.tokenizer("a").input_ids) - 1  # position of "red": after BOS and "a"'s tokens
    n_red = len(sd15.tokenizer("red").input_ids) - 2
    w = torch.ones(1, 77, 1)
    w[0, red:red + n_red] = 1.5
    z = plain * w
    expected = z * (plain.mean() / z.mean())
    assert len(ids) <= 77
    torch.testing.assert_close(weighted, expected, rtol=0, atol=1e-6)
    long_pe, long_npe = encode_sd15(sd15, "word " * 100, "short", clip_skip)
    chunks = -(-(len(sd15.tokenizer("word " * 100, verbose=False).input_ids) - 2) // 75)
    assert chunks > 1 and long_pe.shape == long_npe.shape == (1, 77 * chunks, plain.shape[-1])
    ids = sd15.tokenizer("word " * 100, verbose=False).input_ids
    with torch.no_grad():  # chunk 1 = BOS + the first 75 tokens + EOS through the encoder
        te = sd15.text_encoder
        hidden = te(torch.tensor([ids[:76] + [ids[-1]]]), output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        first = (getattr(te, "final_layer_norm", None) or te.text_model.final_layer_norm)(hidden)
    torch.testing.assert_close(long_pe[:, :77], first, rtol=0, atol=1e-6)
