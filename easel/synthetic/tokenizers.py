"""Tokenizers built offline for the synthetic models: a byte-level CLIP BPE and a T5 unigram.

Both are saved with ``save_pretrained`` in the layout the real repos ship (``vocab.json`` +
``merges.txt``; SentencePiece-style unigram), so transformers loads them as it loads the real ones.
"""
from __future__ import annotations

import json
from pathlib import Path


def _clip_vocab() -> dict[str, int]:
    """A byte-level BPE vocabulary with every single byte symbol (with and without ``</w>``)."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    symbols = [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def write_clip_tokenizer(folder: Path):
    """Write a CLIP tokenizer (``vocab.json``, ``merges.txt``, configs) to ``folder``; return it."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = _clip_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(str(folder))
    return tok



def write_t5_tokenizer(folder: Path):
    """Write a T5 (unigram) tokenizer covering printable ASCII to ``folder``; return it.

    The vocabulary is ``<pad>`` (0), ``</s>`` (1), ``<unk>`` (2), then ``▁``-prefixed and bare
    characters, the SentencePiece conventions of ``google/t5-v1_1-xxl``'s tokenizer.
    """
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
    return tok

