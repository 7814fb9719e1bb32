"""Tool modules, one per tool. ``load_tool(name)`` imports the module named in the tool's catalog file."""
from __future__ import annotations

import importlib
from types import ModuleType

from easel.catalog import load_tools


def load_tool(name: str) -> ModuleType:
    """Import the module implementing ``owner/slug``.

    Raises:
        KeyError: no such tool, or the tool has no implementation on this server.
    """
    spec = load_tools()[name]
    if not spec.module:
        raise KeyError(name)
    return importlib.import_module(spec.module)
