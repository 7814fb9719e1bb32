"""Prompt weighting and long prompts: the A1111 attention syntax, chunked CLIP encoding.

Syntax (AUTOMATIC1111's ``parse_prompt_attention``, also the one diffusers' community
``lpw_stable_diffusion_xl`` and InstantID's ``_full`` pipeline parse): ``(words)`` multiplies the
weight of ``words`` by 1.1, ``(words:1.5)`` by 1.5, ``[words]`` divides it by 1.1; brackets nest
and multiply; ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are literal; unbalanced brackets close at
the end; ``BREAK`` is kept as text (the encoders here do not split at it).

Three encoders use it:

- :func:`encode_sdxl` for InstantID: the ``_full`` pipeline's procedure (its ``LongPromptWeight.
  get_weighted_text_embeddings_sdxl``), so that a weighted or long prompt gives the reference's
  embeddings: the prompt and the negative prompt are tokenised with the first tokenizer (both
  encoders get those ids), padded with EOS to the same length, cut into chunks of 75 tokens each
  wrapped in BOS/EOS (the last chunk is not padded to 77), each chunk through both encoders
  (penultimate hidden states, concatenated), every token whose weight is not 1 moved away from the
  chunk's last (EOS) token's embedding: ``e_eos + (e - e_eos) · w`` (w rounded to float16, as the
  reference), chunks concatenated; the pooled embeddings are the second encoder's of the last chunk.
- :func:`encode_sd15` for the SD 1.5 tool: the same syntax and 75-token chunks, each padded to 77
  with EOS, with Easel's ``clip_skip`` (hidden state ``-(clip_skip + 1)`` through the final layer
  norm), weights applied as A1111 does: ``z · w``, then the chunk rescaled to its unweighted mean.
- :func:`encode_iclight` for IC-Light: the reference's own chunks (``gradio_demo_bg.py``'s
  ``encode_prompt_inner``: 75 tokens, BOS/EOS, EOS padding to 77, no length limit), each weighted
  as :func:`encode_sd15` does; used only for a text with weights (:func:`has_weights`).

The first two are used only when a prompt needs them (:func:`needs_weighting`: weight syntax, or
longer than one chunk); a plain prompt of at most 75 tokens goes through diffusers' own encoding unchanged.
"""
from __future__ import annotations

import re
from typing import Any

CHUNK = 75  # tokens per chunk between BOS and EOS
_ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_SYNTAX = re.compile(r"[()\[\]\\]")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(fragment, weight)`` runs (A1111 syntax, see the module docstring).

    Adjacent runs of equal weight are merged; ``BREAK`` becomes its own ``("BREAK", -1)`` run.
    Returns ``[("", 1.0)]`` for an empty text.

    Example: ``"a (red:1.5) [cat]"`` → ``[("a ", 1.0), ("red", 1.5), (" ", 1.0), ("cat", 1/1.1)]``.
    """
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= factor

    for m in _ATTENTION.finditer(text):
        part, weight = m.group(0), m.group(1)
        if part.startswith("\\"):
            res.append([part[1:], 1.0])
        elif part == "(":
            round_open.append(len(res))
        elif part == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif part == ")" and round_open:
            multiply(round_open.pop(), 1.1)
        elif part == "]" and square_open:
            multiply(square_open.pop(), 1 / 1.1)
        else:
            for i, piece in enumerate(_BREAK.split(part)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([piece, 1.0])
    for pos in round_open:
        multiply(pos, 1.1)
    for pos in square_open:
        multiply(pos, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return [(t, float(w)) for t, w in res]


def tokens_with_weights(tokenizer: Any, text: str) -> tuple[list[int], list[float]]:
    """Token ids of ``text`` (no BOS/EOS, no length limit) and each token's weight."""
    ids: list[int] = []
    weights: list[float] = []
    for fragment, weight in parse_prompt_attention(text):
        tokens = tokenizer(fragment, truncation=False, verbose=False).input_ids[1:-1]
        ids += tokens
        weights += [weight] * len(tokens)
    return ids, weights


def needs_weighting(tokenizer: Any, *texts: str) -> bool:
    """Whether any of ``texts`` has weight syntax (brackets or backslashes) or more than
    :data:`CHUNK` tokens, i.e. whether diffusers' 77-token encoding would cut or misread it."""
    for text in texts:
        if text and (_SYNTAX.search(text) or len(tokenizer(text, truncation=False, verbose=False).input_ids) - 2 > CHUNK):
            return True
    return False


def _chunks(ids: list[int], weights: list[float], bos: int, eos: int, pad_to: int | None):
    """Groups of :data:`CHUNK` tokens wrapped in BOS/EOS (weights 1.0 there); the last group is
    padded with EOS to ``pad_to`` tokens when given. A prompt of exactly a multiple of 75 tokens
    ends with an empty group, as the reference's ``group_tokens_and_weights``."""
    out = []
    i = 0
    while len(ids) - i >= CHUNK:
        out.append(([bos] + ids[i:i + CHUNK] + [eos], [1.0] + weights[i:i + CHUNK] + [1.0]))
        i += CHUNK
    rest, rest_w = ids[i:], weights[i:]
    pad = max(0, pad_to - len(rest) - 2) if pad_to else 0
    out.append(([bos] + rest + [eos] * pad + [eos], [1.0] + rest_w + [1.0] * pad + [1.0]))
    return out


def _same_length(a: tuple[list[int], list[float]], b: tuple[list[int], list[float]], eos: int):
    (ia, wa), (ib, wb) = a, b
    n = max(len(ia), len(ib))
    return (ia + [eos] * (n - len(ia)), wa + [1.0] * (n - len(wa))), (ib + [eos] * (n - len(ib)), wb + [1.0] * (n - len(wb)))


def encode_sdxl(pipe: Any, prompt: str, negative_prompt: str = ""):
    """Weighted, chunked SDXL prompt embeddings as InstantID's ``_full`` pipeline computes them
    (see the module docstring).

    Args:
        pipe: an SDXL pipeline (``tokenizer``, ``text_encoder``, ``text_encoder_2``).

    Returns:
        ``(prompt_embeds, negative_prompt_embeds, pooled, negative_pooled)``: ``[1, T, 2048]``
        (``T`` = 77 per full chunk plus the last chunk's length, the same for both) and ``[1, 1280]``
        on the text encoders' device, in their dtype.
    """
    import torch

    tok = pipe.tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    pos, neg = _same_length(tokens_with_weights(tok, prompt), tokens_with_weights(tok, negative_prompt or ""), eos)
    device = pipe.text_encoder.device

    def encode(ids_weights):
        embeds, pooled = [], None
        for ids, weights in _chunks(*ids_weights, bos, eos, None):
            ids_t = torch.tensor([ids], dtype=torch.long, device=device)
            w = torch.tensor(weights, dtype=torch.float16, device=device)
            one = pipe.text_encoder(ids_t, output_hidden_states=True).hidden_states[-2]
            two = pipe.text_encoder_2(ids_t.to(pipe.text_encoder_2.device), output_hidden_states=True)
            pooled = two[0]
            emb = torch.cat([one, two.hidden_states[-2].to(one.device)], dim=-1).squeeze(0)
            for j in range(len(w)):
                if w[j] != 1.0:
                    emb[j] = emb[-1] + (emb[j] - emb[-1]) * w[j]
            embeds.append(emb.unsqueeze(0))
        return torch.cat(embeds, dim=1), pooled

    with torch.no_grad():
        pe, pooled = encode(pos)
        npe, npooled = encode(neg)
    return pe, npe, pooled, npooled


def encode_sd15(pipe: Any, prompt: str, negative_prompt: str = "", clip_skip: int = 0):
    """Weighted, chunked SD 1.5 prompt embeddings (A1111's weighting, see the module docstring).

    Each 75-token chunk is wrapped in BOS/EOS and padded with EOS to 77; the encoder's hidden
    state ``-(clip_skip + 1)`` goes through its final layer norm (Easel's ``clip_skip``, as the
    SD 1.5 tool's ``encode_prompt`` applies it); token ``i`` is multiplied by its weight and the
    chunk rescaled so its mean equals the unweighted chunk's (A1111's ``z · (mean / mean_w)``).
    Prompt and negative prompt get the same number of chunks (the shorter one padded with EOS).

    Returns:
        ``(prompt_embeds, negative_prompt_embeds)``, each ``[1, 77 · chunks, hidden]`` on the text
        encoder's device, in its dtype.
    """
    import torch

    tok, te = pipe.tokenizer, pipe.text_encoder
    bos, eos = tok.bos_token_id, tok.eos_token_id
    pos, neg = tokens_with_weights(tok, prompt), tokens_with_weights(tok, negative_prompt or "")
    chunks = max(len(_chunks(*pos, bos, eos, 77)), len(_chunks(*neg, bos, eos, 77)))
    final_ln = getattr(te, "final_layer_norm", None) or te.text_model.final_layer_norm

    def encode(ids_weights):
        groups = _chunks(*ids_weights, bos, eos, 77)
        groups += [([bos] + [eos] * 76, [1.0] * 77)] * (chunks - len(groups))
        out = []
        for ids, weights in groups:
            hidden = te(torch.tensor([ids], device=te.device), output_hidden_states=True).hidden_states[-(clip_skip + 1)]
            out.append(a1111_weight(final_ln(hidden), weights))
        return torch.cat(out, dim=1)

    with torch.no_grad():
        return encode(pos), encode(neg)


def a1111_weight(z, weights: list[float]):
    """A1111's weighting of one chunk's embeddings ``z`` (``[1, tokens, hidden]``): ``z · w`` per
    token, then rescaled so the chunk's mean is the unweighted one's; ``z`` itself when every
    weight is 1."""
    import torch

    w = torch.tensor(weights, dtype=z.dtype, device=z.device)[None, :, None]
    if not bool((w != 1.0).any()):
        return z
    mean = z.float().mean()
    z = z * w
    return z * (mean / z.float().mean()).to(z.dtype)


def has_weights(text: str) -> bool:
    """Whether ``text`` gives any token a weight other than 1 in the A1111 syntax."""
    return any(weight != 1.0 for _, weight in parse_prompt_attention(text or ""))


def encode_iclight(pipe: Any, text: str):
    """IC-Light's prompt encoding (``encode_prompt_inner`` of ``gradio_demo_bg.py``) with A1111 weights.

    The reference's chunks: the text's tokens (no length limit) in groups of 75, each wrapped in
    BOS/EOS and padded with EOS to 77, an empty text one empty chunk, through the text encoder
    (``last_hidden_state``). Here the tokens come from :func:`tokens_with_weights` (the A1111
    syntax is read, not tokenised literally) and each chunk is weighted by :func:`a1111_weight`,
    as :func:`encode_sd15` does. Use it only for a text with weights (:func:`has_weights`); plain
    texts keep the reference's own encoding, bit for bit.

    Returns:
        ``[chunks, 77, hidden]`` on the text encoder's device, in its dtype.
    """
    import torch

    tok, te = pipe.tokenizer, pipe.text_encoder
    size, body = tok.model_max_length, tok.model_max_length - 2
    ids, weights = tokens_with_weights(tok, text)
    out = []
    with torch.inference_mode():
        for i in range(0, max(len(ids), 1), body):
            chunk = [tok.bos_token_id] + ids[i:i + body] + [tok.eos_token_id]
            w = [1.0] + weights[i:i + body] + [1.0]
            chunk, w = chunk[:size] + [tok.eos_token_id] * (size - len(chunk)), w[:size] + [1.0] * (size - len(w))
            z = te(torch.tensor([chunk], device=te.device)).last_hidden_state
            out.append(a1111_weight(z, w))
    return torch.cat(out, dim=0)
