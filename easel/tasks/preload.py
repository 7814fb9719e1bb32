"""Warming tools before the first task (``Settings.worker.preload``, ``easel serve --preload``).

A worker runs each preloaded tool once through its own ``prepare`` and ``run``, with the tool's
default inputs, one denoising step and one sample, in a :class:`WarmupContext`: no task, nothing
stored. The tool's pipelines (and any weights it resolves or downloads) end up in the worker's
model cache under the same keys a real task with the default model uses, so that task starts
denoising at once. Image inputs get a plain drawn picture; a tool that refuses it (InstantID
needs a face its detector finds) is reported, and whatever it loaded before stays warm.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

from easel.catalog import load_tools
from easel.tools import load_tool

log = logging.getLogger("easel.worker")

WARMUP = {"steps": 1, "samples": 1}  # the smallest run that loads everything a real one does


class WarmupContext:
    """The ``ToolContext`` of a warm-up run (see :class:`easel.tools.base.ToolContext`): progress
    is not recorded (it still stops the run when the worker must stop), logs go to the debug log,
    image inputs are a drawn 512×512 picture, extra outputs are ignored."""

    extras_requested = False

    def __init__(self, worker, output_dir: Path):
        self.worker = worker
        self.models = worker.models
        self.output_dir = output_dir

    def started(self) -> None:
        pass

    def progress(self, step: int, total: int, preview: bytes | None = None, task: str = "Generate") -> None:
        from easel.tasks.runner import ServerStopping

        if self.worker.should_stop():
            raise ServerStopping()

    def wants_preview(self, step: int, total: int) -> bool:
        return False

    def log(self, line: str) -> None:
        log.debug("warm-up: %s", line)

    def input_file(self, value: str) -> Path:
        from easel.tools.base import ToolError

        raise ToolError("a warm-up run has no uploaded files")

    def image(self, field: str, value: str):
        from PIL import Image, ImageDraw

        img = Image.new("RGB", (512, 512), (200, 200, 200))
        draw = ImageDraw.Draw(img)
        draw.ellipse([176, 96, 336, 276], fill=(224, 180, 150))
        draw.polygon([(136, 512), (196, 290), (316, 290), (376, 512)], fill=(70, 90, 160))
        return img

    def extra_output(self, name: str, image) -> None:
        pass


def warmup_inputs(tool: str, catalog) -> dict:
    """The validated inputs of ``tool``'s warm-up run: its defaults, :data:`WARMUP` where the tool
    has those inputs, and a placeholder for required text (prompts) and image inputs."""
    spec = load_tools()[tool]
    raw = {}
    for item in spec.inputs:
        if item.name in WARMUP:
            raw[item.name] = WARMUP[item.name]
        elif item.accepts == "image" or (item.required and item.type in ("text", "textarea")):
            raw[item.name] = "warm-up"
    return spec.validate(raw, catalog)


def preload(worker, tool: str) -> float:
    """Run ``tool`` once in ``worker`` to load its pipelines; returns the seconds it took.

    Raises:
        Exception: whatever the tool raised (the caller logs it and goes on).
    """
    t0 = time.monotonic()
    inputs = warmup_inputs(tool, worker.catalog)
    module = load_tool(tool)
    folder = Path(tempfile.mkdtemp(prefix="easel-warmup-", dir=worker.settings.core.data_dir))
    try:
        ctx = WarmupContext(worker, folder)
        module.run(module.prepare(inputs, ctx), ctx)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return time.monotonic() - t0
