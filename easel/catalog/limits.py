"""Length caps of request fields: every value a Run stores has a bound (docs/api.md, "Field caps").

A cap counts characters of a text value; a list or object is counted as its compact JSON text.
Caps by kind of field:

- prompts (``textarea`` inputs: ``prompt``, ``negativePrompt``): :data:`PROMPT_CHARS`;
- URLs (an input whose name ends in ``Url``, and ``callbackUrl``): :data:`URL_CHARS`;
- other text inputs (``seed``, ``bg_source`` ...), select values and numbers sent as text:
  :data:`SHORT_CHARS`;
- multiselect lists (``selectedLoraModel``): :data:`LIST_CHARS`;
- any other field (not an input of the tool; stored in ``parameters`` as sent): :data:`OTHER_CHARS`,
  and a Run may carry at most :data:`MAX_FIELDS` fields.
"""
from __future__ import annotations

import json
from typing import Any

PROMPT_CHARS = 5000
URL_CHARS = 8192
SHORT_CHARS = 256
LIST_CHARS = 4096
OTHER_CHARS = 2048
MAX_FIELDS = 100
NAME_CHARS = 128  # a field's name


def field_cap(name: str, kind: str | None) -> int:
    """The cap in characters of field ``name``; ``kind`` is the tool input's type (``text``,
    ``textarea``, ``number``, ``float``, ``select``, ``multiselect``), None for a field that is
    not one of the tool's inputs."""
    if name.lower().endswith("url"):
        return URL_CHARS
    if kind == "textarea":
        return PROMPT_CHARS
    if kind == "multiselect":
        return LIST_CHARS
    if kind is None:
        return OTHER_CHARS
    return SHORT_CHARS


def size(value: Any) -> int:
    """Characters of ``value``: a string's length, else the length of its compact JSON text."""
    if isinstance(value, str):
        return len(value)
    try:
        return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")))
    except (TypeError, ValueError):
        return len(repr(value))


def over_cap(kinds: dict[str, str], fields: dict[str, Any]) -> tuple[str, int, int] | None:
    """The first field of ``fields`` (a Run's body) longer than its cap, as ``(name, cap, size)``,
    or None. ``kinds`` maps the tool's input names to their types. More than :data:`MAX_FIELDS`
    fields count as ``("body", MAX_FIELDS, number of fields)``, a field name longer than
    :data:`NAME_CHARS` as ``("name", NAME_CHARS, its length)``."""
    if len(fields) > MAX_FIELDS:
        return "body", MAX_FIELDS, len(fields)
    for name, value in fields.items():
        if len(str(name)) > NAME_CHARS:
            return "name", NAME_CHARS, len(str(name))
        cap = field_cap(str(name), kinds.get(name))
        if isinstance(value, str) and len(value) <= cap:
            continue
        n = size(value)
        if n > cap:
            return str(name), cap, n
    return None
