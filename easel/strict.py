"""One strict parser for every number, id and header value Easel reads from a request.

Python's ``int()``/``float()``/``str.isdigit()`` accept far more than a client means: ``"²"`` is
a digit to ``isdigit`` but not to ``int``; Arabic-Indic digits and ``"1_000"`` are integers to
``int``; 5,000 digits raise ``ValueError`` (CPython's 4,300-digit limit) and 30 digits overflow a
database integer. Every request value goes through these functions instead: ASCII only, bounded
length, a range check, and a :class:`StrictError` whose message names the field.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

_INT = re.compile(r"[+-]?[0-9]{1,40}", re.ASCII)
_DECIMAL = re.compile(r"[+-]?(?:[0-9]{1,40}(?:\.[0-9]{0,40})?|\.[0-9]{1,40})(?:[eE][+-]?[0-9]{1,3})?", re.ASCII)
_SURROGATE = re.compile("[\ud800-\udfff]")
_LONG_DIGITS = re.compile(r"[0-9]{19}", re.ASCII)
MAX_ID_DIGITS = 18  # fits a signed 64-bit database integer


class StrictError(ValueError):
    """A request value that is not what its field accepts; ``str()`` is the client's message."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def _show(raw: Any) -> str:
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_int(raw: Any, field: str, *, lo: int | None = None, hi: int | None = None,
              what: str = "an integer") -> int:
    """``raw`` (an ``int`` or a string of ASCII digits, optional sign, at most 40 characters) as an int.

    Raises:
        StrictError: anything else, or a value outside ``[lo, hi]`` (the message gives the range).
    """
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise StrictError(field, f"Request parameter [{field}] must be {what} (got {_show(raw)})")
    if isinstance(raw, str):
        text = raw.strip()
        if not _INT.fullmatch(text):
            raise StrictError(field, f"Request parameter [{field}] must be {what} written with ASCII digits "
                                     f"(at most 40; got {_show(raw)})")
        value = int(text)
    else:
        value = raw
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise StrictError(field, f"Request parameter [{field}] must be between {lo if lo is not None else '-inf'} "
                                 f"and {hi if hi is not None else 'inf'} (got {_show(raw)})")
    return value


def parse_id(raw: Any, field: str) -> int:
    """A database id: 1 to 18 ASCII digits (no sign)."""
    text = str(raw).strip() if isinstance(raw, (int, str)) and not isinstance(raw, bool) else None
    if text is None or not text.isascii() or not text.isdigit() or len(text) > MAX_ID_DIGITS:
        raise StrictError(field, f"Request parameter [{field}] must be a task id: 1 to {MAX_ID_DIGITS} ASCII "
                                 f"digits (got {_show(raw)})")
    return int(text)


def parse_number(raw: Any, field: str) -> float:
    """An int, a finite float, or a decimal string (ASCII, ≤ 40 digits, optional exponent) as a float.

    Raises:
        StrictError: anything else, or a value too large for a float.
    """
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise StrictError(field, f"Request parameter [{field}] must be integer or float (got {_show(raw)})")
    if isinstance(raw, str) and not _DECIMAL.fullmatch(raw.strip()):
        raise StrictError(field, f"Request parameter [{field}] must be integer or float written with ASCII "
                                 f"digits (got {_show(raw)})")
    if isinstance(raw, int) and abs(raw) >= 10**40:
        raise StrictError(field, f"Request parameter [{field}] is out of range (got {_show(raw)})")
    value = float(raw.strip() if isinstance(raw, str) else raw)
    if not math.isfinite(value):
        raise StrictError(field, f"Request parameter [{field}] must be a finite number (got {_show(raw)})")
    return value


def _encodable(value: Any) -> bool:
    """Whether ``value`` serialises as UTF-8 JSON, checked in C by orjson (which refuses lone
    surrogates): the common case costs microseconds instead of a walk over every string."""
    try:
        orjson.dumps(value)
        return True
    except (orjson.JSONEncodeError, TypeError):
        return False


def lone_surrogate_field(value: Any, path: str = "") -> str | None:
    """The name (dotted path) of the first string in ``value`` holding a lone UTF-16 surrogate
    (``"\\ud800"`` from a JSON escape: not valid Unicode, cannot be stored or answered), or None."""
    if _encodable(value):
        return None
    stack = [(path, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return where or "body"
        elif isinstance(item, dict):
            for k, v in item.items():
                if isinstance(k, str):
                    try:
                        k.encode("utf-8")
                    except UnicodeEncodeError:
                        return where or "body"
                stack.append((f"{where}.{k}" if where else str(k), v))
        elif isinstance(item, list):
            stack.extend((where, v) for v in item)
    return None


INT64 = (-2**63, 2**63 - 1)  # the integers a request value may be (a database integer; orjson writes them)


def _unstorable(item: Any) -> bool:
    if isinstance(item, bool):
        return False
    if isinstance(item, int):
        return not INT64[0] <= item <= INT64[1]
    return isinstance(item, float) and not math.isfinite(item)


def unstorable_number_field(value: Any, path: str = "") -> str | None:
    """The name (dotted path) of the first number in ``value`` that cannot be stored and answered
    as JSON: an integer outside the signed 64-bit range (``orjson`` refuses 2^64 and up; a database
    column overflows) or a float that is NaN or infinite (Python's parser reads ``NaN``,
    ``Infinity`` and ``1e400``, which are not JSON). None when there is none.

    The common case costs one ``json.dumps`` (in C): only a text with ``NaN``, ``Infinity`` or a
    run of 19 digits is walked."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = "NaN"
    if "NaN" not in text and "Infinity" not in text and not _LONG_DIGITS.search(text):
        return None
    stack = [(path, value)]
    while stack:
        where, item = stack.pop()
        if _unstorable(item):
            return where or "body"
        if isinstance(item, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((where, v) for v in item)
    return None


def clean_text(value: Any) -> Any:
    """``value`` with every lone surrogate replaced by U+FFFD and every integer outside the signed
    64-bit range written as a string (for answering stored data, which may predate the checks
    at Run: see :func:`unstorable_number_field`)."""
    if isinstance(value, (dict, list)) and _encodable(value):
        return value
    return _clean_text(value)


def _clean_text(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and not INT64[0] <= value <= INT64[1]:
        return str(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_clean_text(k): _clean_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean_text(v) for v in value]
    return value


def depth(value: Any) -> int:
    """Nesting depth of JSON containers (a scalar is 0), computed without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, d = stack.pop()
        if isinstance(item, dict):
            stack.extend((v, d + 1) for v in item.values())
            deepest = max(deepest, d + 1)
        elif isinstance(item, list):
            stack.extend((v, d + 1) for v in item)
            deepest = max(deepest, d + 1)
    return deepest
