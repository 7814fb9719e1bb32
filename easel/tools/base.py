"""The contract between the worker and a tool module.

A tool module (``easel/tools/<tool>.py``) exposes:

- ``TOOL``: the ``owner/slug`` it implements (its input schema is ``easel/catalog/tools/<owner>__<slug>.json``);
- ``prepare(inputs, ctx) -> plan``: the preprocess stage: resolve and download weights and input
  files, reject what cannot run. No model is loaded yet.
- ``run(plan, ctx) -> list[pathlib.Path]``: load (or reuse) the pipeline, call ``ctx.started()``
  right before inference, report each denoising step with ``ctx.progress`` (which also raises
  :class:`TaskKilled` when a kill was requested), write output files into ``ctx.output_dir`` and
  return their paths in order.

A tool knows nothing of HTTP, the store or the executor: everything comes through ``ctx``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class TaskKilled(Exception):
    """Raised inside a tool when its task was killed; the worker ends the task as ``task_cancel``."""


class ToolError(Exception):
    """A failure the user can act on (bad weights, incompatible LoRA...). Its message goes to ``debugerror``."""


class ToolContext(Protocol):
    """What the worker gives a tool."""

    models: Any  # easel.models.ModelManager
    output_dir: Path

    def started(self) -> None:
        """Mark the start of inference (``task_start``)."""

    def progress(self, step: int, total: int, preview: bytes | None = None) -> None:
        """Report that denoising step ``step`` of ``total`` finished; raises :class:`TaskKilled` on kill.

        ``preview``: an optional small JPEG of the current latent (``easel.tools.previews``).
        """

    def wants_preview(self, step: int, total: int) -> bool:
        """Whether the tool should render a preview for this step (every few steps, and the last)."""

    def log(self, line: str) -> None:
        """Append a line to the task's ``debugoutput``."""

    def input_file(self, value: str) -> Path:
        """Local path of an uploaded file referenced as ``upload:<name>`` in an input."""


def write_pngs(images: list, output_dir: Path, seed: int, parameters, params: dict) -> list[Path]:
    """Save generated images as ``0.png`` … ``N-1.png`` with their generation parameters.

    Args:
        images: PIL images; image *i* was generated with seed ``seed + i``.
        parameters: ``f(seed) -> str``: the A1111-style text for the PNG ``parameters`` chunk
            (what image viewers and "PNG info" tools read).
        params: JSON-able parameters; written with ``"seed"`` to the ``easel`` text chunk.

    Returns:
        The written paths, in order.
    """
    import json

    from PIL.PngImagePlugin import PngInfo

    paths = []
    for i, image in enumerate(images):
        info = PngInfo()
        info.add_text("parameters", parameters(seed + i))
        info.add_text("easel", json.dumps({**params, "seed": seed + i}, sort_keys=True))
        path = output_dir / f"{i}.png"
        image.save(path, pnginfo=info)
        paths.append(path)
    return paths
