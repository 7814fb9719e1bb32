"""IC-Light's prompt encoding with A1111 weights: plain texts keep the reference's encoding
(``encode_prompt_inner`` of ``gradio_demo_bg.py``) bit for bit; a weighted text gets the same
chunks, its tokens weighted as A1111 does."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def sd15(tiny):
    from easel.tools.sd_lora import read_pipeline
    from easel.weights.sources import Weights

    return read_pipeline(Weights("diffusers", tiny["sd15"]), torch.float32)


def _reference_chunks(pipe, text):
    """``encode_prompt_inner`` of IC-Light's ``gradio_demo_bg.py``, transcribed: 75-token chunks
    wrapped in BOS/EOS, padded with EOS to 77, ``last_hidden_state``."""
    tok = pipe.tokenizer
    ids = tok(text, truncation=False, add_special_tokens=False)["input_ids"]
    chunks = [[tok.bos_token_id] + ids[i:i + 75] + [tok.eos_token_id] for i in range(0, max(len(ids), 1), 75)]
    chunks = [c[:77] + [tok.eos_token_id] * (77 - len(c)) for c in chunks]
    with torch.no_grad():
        return pipe.text_encoder(torch.tensor(chunks)).last_hidden_state


def test_plain_iclight_prompts_keep_the_reference_encoding(sd15):
    from easel.pipelines.ic_light import encode_prompt

    for text in ("a woman, best quality", "", "word " * 100, r"a \(literal\) bracket"):
        assert torch.equal(encode_prompt(sd15, text), _reference_chunks(sd15, text)), text


def test_weighted_iclight_prompts_are_a1111_weighted_in_the_reference_chunks(sd15):
    from easel.pipelines.ic_light import encode_prompt

    plain = _reference_chunks(sd15, "a red cat, best quality")
    weighted = encode_prompt(sd15, "a (red:1.5) cat, best quality")
    red = len(sd15.tokenizer("a").input_ids) - 1  # after BOS and "a"
    n_red = len(sd15.tokenizer("red").input_ids) - 2
    w = torch.ones(1, 77, 1)
    w[0, red:red + n_red] = 1.5
    z = plain * w
    torch.testing.assert_close(weighted, z * (plain.mean() / z.mean()), rtol=0, atol=1e-6)
    assert not torch.equal(weighted, plain)
    # [word] divides by 1.1; long weighted texts keep the reference's chunk count
    assert not torch.equal(encode_prompt(sd15, "a [red] cat"), _reference_chunks(sd15, "a red cat"))
    long = encode_prompt(sd15, "(word:1.2) " * 100)
    assert long.shape == _reference_chunks(sd15, "word " * 100).shape and long.shape[0] > 1
