"""Checks across several inputs of one tool, made at submission (``/Run``) after each input was
coerced on its own (:meth:`easel.catalog.ToolSpec.validate`), so a combination that cannot run
is refused with a message naming the field instead of failing in the worker.

Each rule is ``f(inputs) -> None`` over the validated inputs (field name → typed value) and raises
:class:`easel.catalog.InputError`. Rules are registered per tool name in :data:`RULES`.
"""
from __future__ import annotations

from typing import Any, Callable

IC_LIGHT = "wiro/ic-light-background"


def highres_steps(steps: int, denoise: float) -> tuple[int, int]:
    """IC-Light's high-res pass: ``(scheduled, run)``. The reference schedules
    ``round(steps / denoise)`` image-to-image steps, and diffusers' img2img runs the last
    ``min(int(scheduled · denoise), scheduled)`` of them (``get_timesteps``)."""
    scheduled = int(round(steps / denoise))
    return scheduled, min(int(scheduled * denoise), scheduled)


def ic_light_highres(inputs: dict[str, Any]) -> None:
    """Refuse ``steps`` / ``highres_denoise`` pairs whose high-res pass would run no step (e.g.
    ``steps=1`` with ``highres_denoise`` ≥ 0.67: one step scheduled, ``int(0.67)`` = 0 run, and
    diffusers fails on an empty schedule). The message names ``highres_denoise`` and the
    smallest ``steps`` that works with it.

    Raises:
        InputError: naming ``highres_denoise``.
    """
    from . import InputError

    steps, denoise = inputs.get("steps"), inputs.get("highres_denoise")
    if not isinstance(steps, int) or not isinstance(denoise, (int, float)) or denoise <= 0:
        return
    scheduled, run = highres_steps(steps, float(denoise))
    if run >= 1:
        return
    enough = next((n for n in range(steps + 1, 1001) if highres_steps(n, float(denoise))[1] >= 1), None)
    hint = f"use steps of at least {enough}" if enough else "use more steps"
    raise InputError("highres_denoise", (
        f"Request parameter [highres_denoise] {denoise:g} with [steps] {steps} runs no high-resolution "
        f"step (round({steps} / {denoise:g}) = {scheduled} scheduled, int({scheduled} x {denoise:g}) = {run} run); "
        f"{hint}, or a highres_denoise of 1"))


RULES: dict[str, list[Callable[[dict[str, Any]], None]]] = {IC_LIGHT: [ic_light_highres]}


def check(tool: str, inputs: dict[str, Any]) -> None:
    """Run ``tool``'s cross-field rules on its validated ``inputs``.

    Raises:
        InputError: from the first rule that refuses.
    """
    for rule in RULES.get(tool, ()):
        rule(inputs)
