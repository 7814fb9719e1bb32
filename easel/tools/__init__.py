"""Tool modules, one per tool, found through the ``easel.tools`` entry-point group
(:mod:`easel.tools.registry`). ``load_tool(name)`` gives the registered tool."""
from __future__ import annotations

from .registry import RegisteredTool, tools


def load_tool(name: str) -> RegisteredTool:
    """The registered tool ``owner/slug``: its declaration and its typed ``prepare``/``run``.

    Raises:
        KeyError: no such tool on this server.
    """
    return tools()[name]
