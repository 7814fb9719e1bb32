"""Checking that a downloaded weight file is a well-formed ``.safetensors`` file (header, dtypes,
offsets) before anything reads its tensors; pickles are refused without being deserialised."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from easel.net.policy import FetchError

_SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                       "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def check_safetensors(path: Path) -> dict:
    """Validate that ``path`` is a well-formed safetensors file without deserialising tensors.

    Returns:
        The header's tensor table (name → {dtype, shape, data_offsets}).

    Raises:
        FetchError: a pickle (``.ckpt``/``.pt``/``.bin``), a truncated file, or an inconsistent header.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise FetchError("file is too short to be a .safetensors file")
        if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or head[:2] == b"PK":
            raise FetchError("file is a pickle / zip checkpoint (.ckpt, .pt, .bin); only .safetensors is accepted")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > min(size - 8, 100 * 1024**2):
            raise FetchError("file is not a .safetensors file (bad header length)")
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            raise FetchError("file is not a .safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise FetchError("file is not a .safetensors file (header is not an object)")
    body = size - 8 - n
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        raise FetchError(".safetensors file holds no tensors")
    for name, info in tensors.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            count = 1
            for d in shape:
                count *= int(d)
            if dtype not in _SAFETENSORS_DTYPES or not 0 <= start <= end <= body or end - start != count * _SAFETENSORS_DTYPES[dtype]:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise FetchError(f".safetensors header entry {name!r} is inconsistent") from None
    return tensors
