"""Checks across several inputs of one tool, made at submission (``/Run``) after each input was
coerced on its own (:meth:`easel.catalog.ToolSpec.validate`), so a combination that cannot run
is refused with a message naming the field instead of failing in the worker.

Each rule is ``f(inputs) -> None`` over the tool's typed inputs (``easel.tools.base.ToolInputs``)
and raises :class:`easel.catalog.InputError`. A tool declares its rules with itself
(``easel.tools.base.ToolDeclaration.rules``).
"""
from __future__ import annotations

from typing import Any


def check(tool: str, inputs: dict[str, Any]) -> None:
    """Run ``tool``'s cross-field rules (those its declaration lists) on its validated ``inputs``.

    Raises:
        InputError: from the first rule that refuses.
    """
    from easel.tools.registry import tools

    registered = tools().get(tool)
    if registered is None or not registered.declaration.rules:
        return
    typed = registered.parse(inputs)
    for rule in registered.declaration.rules:
        rule(typed)
