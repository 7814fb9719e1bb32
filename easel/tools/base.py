"""The contract between the worker and a tool module: a tool is one typed plug-in.

A tool module (``easel/tools/<tool>.py``, or any installed package) registers itself in the
``easel.tools`` entry-point group (``pyproject.toml``; :mod:`easel.tools.registry` finds it) and
exposes:

- ``TOOL``: a :class:`ToolDeclaration`: the ``owner/slug`` it implements, its catalog file (the
  Wiro input schema), its typed inputs class (a :class:`ToolInputs` checked against that schema
  when the tool is registered: a mismatch fails loudly), and its model :class:`Family` (dtype
  table row, Celery queue, tiny stand-ins, preview factors) plus the other families it loads;
- ``prepare(inputs, ctx) -> Plan``: the preprocess stage, from the typed inputs to a typed plan
  (a dataclass): resolve and download weights and input files, reject what cannot run. No model
  is loaded yet.
- ``run(plan, ctx) -> list[pathlib.Path]``: load (or reuse) the pipeline, call ``ctx.started()``
  right before inference, report each denoising step with ``ctx.progress`` (which also raises
  :class:`TaskKilled` when a kill was requested), write output files into ``ctx.output_dir`` and
  return their paths in order.

A tool knows nothing of HTTP, the store or the executor: everything comes through ``ctx``, whose
services are typed: ``ctx.models`` (:class:`easel.weights.ModelManager`: checkpoints, LoRAs with
their scale, pipelines, derived pipelines, components, adapter state, runtime options),
``ctx.image`` (decoded, validated image inputs), ``ctx.progress`` (with a phase name, see
:class:`Phases`), ``ctx.extra_output`` (named intermediate images). Adding a tool is one module
plus one catalog file.
"""
from __future__ import annotations

import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar, Generic, Mapping, NamedTuple, Protocol, Sequence, TypeVar, Union

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image
    from PIL.PngImagePlugin import PngInfo

    from easel.weights import ModelManager


# -- declarations -------------------------------------------------------------------------------

@dataclass(frozen=True)
class DtypeKind:
    """One row of the precision table (:mod:`easel.weights.precision`): the torch dtype names a
    kind of network runs in on CUDA (and on the CPU with ``cpu_precision = "half"``).

    Attributes:
        name: the kind (``sd15``, ``matting``...), what ``ModelManager.precision`` is asked for.
        dtype: dtype name of the networks, e.g. ``"float16"``.
        vae_dtype: dtype name of the VAE (the same as ``dtype`` for networks without one).
        vae_upcast: a float16 VAE whose config says ``force_upcast`` is held in float32 (SDXL).
    """

    name: str
    dtype: str
    vae_dtype: str
    vae_upcast: bool = False


@dataclass(frozen=True)
class Preview:
    """Latent → RGB preview factors of a family's VAE (:mod:`easel.tools.previews`): one RGB row
    per latent channel, and a bias."""

    factors: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class TinySource:
    """The offline tiny models (``easel.synthetic``) that stand in for a family's catalog
    checkpoints and LoRAs with ``--model-source tiny``: names in ``ModelSources.tiny()``.

    Attributes:
        checkpoint: the diffusers folder (e.g. ``sd15``).
        single_file: the single-file checkpoint standing in for one-file sources ("" when the
            family has none: the folder serves every source).
        lora_prefix: LoRAs are ``<lora_prefix>-<layout>`` (peft, kohya, ...); "" for none.
    """

    checkpoint: str
    single_file: str = ""
    lora_prefix: str = ""


@dataclass(frozen=True)
class Family:
    """A model family: what a worker keeps warm, and a fleet's Celery queue (``<prefix>.<name>``).

    Attributes:
        name: the family and queue name; also its precision kind.
        precision: its row of the dtype table (``precision.name == name``).
        preview: its VAE's latent-preview factors (None: no previews).
        tiny: its tiny stand-ins (None: tiny mode cannot run its checkpoints).
        random: whether ``easel.synthetic.fullsize`` writes random full-size weights for it.
        components: precision rows of auxiliary networks it loads (condition estimators, matting).
    """

    name: str
    precision: DtypeKind
    preview: Preview | None = None
    tiny: TinySource | None = None
    random: bool = False
    components: tuple[DtypeKind, ...] = ()


InputValue = Union[str, int, float, list[str]]
"""One value of ``ToolSpec.validate``'s output: an input coerced to its schema type (:data:`SCHEMA_TYPES`),
or a per-model scale setting (float)."""


class ToolInputs(BaseModel):
    """Base of a tool's typed inputs: one field per input of its catalog file, named as the
    schema names it, typed by the schema's type (:data:`SCHEMA_TYPES`): checked when the tool is
    registered (:func:`easel.tools.registry.check_inputs`).

    ``scales`` holds the per-model scale settings (``generatesettings`` ids, e.g.
    ``flux-RealismLora``) that ``ToolSpec.validate`` adds for each selected model.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    NOT_IN_SCHEMA: ClassVar[tuple[str, ...]] = ("scales",)

    scales: dict[str, float] = {}

    @classmethod
    def from_validated(cls: "type[I]", values: Mapping[str, InputValue]) -> "I":
        """The typed inputs from ``ToolSpec.validate``'s output (inputs already coerced to their
        schema types; every other key is a scale setting).

        Raises:
            pydantic.ValidationError: a value of another type than the field's.
        """
        names = set(cls.model_fields) - set(cls.NOT_IN_SCHEMA)
        fields = {k: v for k, v in values.items() if k in names}
        scales = {k: float(v) for k, v in values.items() if k not in names}
        return cls.model_validate({**fields, "scales": scales})


I = TypeVar("I", bound=ToolInputs)

# catalog input type → the Python type of its field (what ``ToolSpec.validate`` produces)
SCHEMA_TYPES: dict[str, object] = {"number": int, "float": float, "text": str, "textarea": str, "select": str,
                                   "multiselect": list[str]}


@dataclass(frozen=True)
class ToolDeclaration(Generic[I]):
    """What a tool module declares as ``TOOL`` (see the module docstring), generic in its inputs
    class ``I`` (its rules take that class).

    Attributes:
        name: ``owner/slug``.
        catalog: its catalog file (the Wiro schema, plus its ``example`` request).
        inputs: its :class:`ToolInputs` subclass.
        family: the family whose queue and warm pipelines run its tasks.
        uses: other families whose weights it loads (registered with it: their dtypes, tiny
            stand-ins and previews).
        rules: checks across several inputs, made at submission (:mod:`easel.catalog.rules`):
            ``rule(inputs)`` on the typed inputs raises ``easel.catalog.InputError``.
        fixed: catalog ids its pipeline loads whatever the request (not visible in its inputs).
        estimators: condition (``depth``, ``openpose``) → catalog id of the estimator a chosen
            ControlNet of that condition needs.
        (``fixed`` and ``estimators`` let ``easel models pull`` fetch ahead exactly what a Run loads.)
    """

    name: str
    catalog: Path
    inputs: type[I]
    family: Family
    uses: tuple[Family, ...] = field(default=())
    rules: tuple[Callable[[I], None], ...] = field(default=())  # each takes the tool's own Inputs
    fixed: tuple[str, ...] = field(default=())
    estimators: tuple[tuple[str, str], ...] = field(default=())

    @property
    def families(self) -> tuple[Family, ...]:
        """``family`` then ``uses``."""
        return (self.family, *self.uses)


class TaskKilled(Exception):
    """Raised inside a tool when its task was killed; the worker ends the task as ``task_cancel``."""


class ToolError(Exception):
    """A failure the user can act on (bad weights, incompatible LoRA...). Its message goes to ``debugerror``."""


class ToolContext(Protocol):
    """What the worker gives a tool."""

    models: "ModelManager"
    output_dir: Path
    extras_requested: bool  # the request asked for intermediate images (``extraOutputs``)

    def started(self) -> None:
        """Mark the start of inference (``task_start``)."""

    def progress(self, step: int, total: int, preview: bytes | None = None, task: str = "Generate") -> None:
        """Report that step ``step`` of ``total`` finished; raises :class:`TaskKilled` on kill.

        ``preview``: an optional small JPEG of the current latent (``easel.tools.previews``).
        ``task``: the phase's name, sent as the progress frame's ``task`` (one bar over all
        phases: ``step``/``total`` count every phase's steps; see :class:`Phases`).
        """

    def wants_preview(self, step: int, total: int) -> bool:
        """Whether the tool should render a preview for this step (every few steps, and the last)."""

    def log(self, line: str) -> None:
        """Append a line to the task's ``debugoutput``."""

    def input_file(self, value: str) -> Path:
        """Local path of an uploaded file referenced as ``upload:<name>`` in an input."""

    def image(self, field: str, value: str) -> "Image":
        """The image input ``field`` (whose value is ``value``), decoded and validated.

        ``value`` may be a multipart upload (``upload:<name>``, sent in the field's own name or
        Wiro's ``inputImage``/``inputImage2`` aliases), a file uploaded with ``/v1/File/Upload``
        (its bare name, or ``file:<id>``), this server's own output/upload URL (read locally), or an
        ``http(s)`` URL (the safe fetcher, capped at ``upload_max_bytes``). See :mod:`easel.images`.

        Returns:
            A ``PIL.Image`` in mode ``RGB`` or ``RGBA``, EXIF orientation applied, at most
            ``max_image_pixels`` pixels.

        Raises:
            ToolError: naming ``field``: missing, unreachable, not an image, or too large.
        """

    def extra_output(self, name: str, image: "Image") -> None:
        """Add a named intermediate image (``extra-<name>.png``), returned after the main images
        when the request asked for them (``extras_requested``); ignored otherwise."""


class Phases:
    """One progress bar over several phases (e.g. matting, low-res pass, high-res pass).

    ``step``/``total`` count the steps of all phases together, and each report names its phase in
    the progress frame's ``task``.

    Example::

        bar = Phases(ctx, [("Matting", 1), ("Low-res pass", 20), ("High-res pass", 10)])
        bar.step("Matting")
        for i in range(20): bar.step("Low-res pass")
    """

    def __init__(self, ctx: ToolContext, phases: list[tuple[str, int]]):
        self.ctx = ctx
        self.phases = dict(phases)
        self.total = sum(n for _, n in phases)
        self.done = 0

    def wants_preview(self) -> bool:
        """Whether the next step should carry a latent preview."""
        return self.ctx.wants_preview(self.done + 1, self.total)

    def step(self, phase: str, preview: bytes | None = None) -> None:
        """Count one finished step of ``phase`` (raises :class:`TaskKilled` on kill)."""
        if phase not in self.phases:
            raise KeyError(phase)
        self.done = min(self.done + 1, self.total)
        self.ctx.progress(self.done, self.total, preview, task=phase)


# PNG encoding. Each image is encoded in its own thread (Pillow's encoder releases the GIL, so
# the images of a task use every core), with zlib's run-length strategy after PNG's per-row
# filters: 2-3x faster than the default (level 6) and, on filtered image rows, as small within a
# few per cent (``docs/benchmarks.md``). Still plain PNG: every reader decodes it.
PNG_OPTIONS = {"compress_level": 6, "compress_type": zlib.Z_RLE}
_png_pool: ThreadPoolExecutor | None = None
_png_pool_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _png_pool
    with _png_pool_lock:
        if _png_pool is None:
            _png_pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)),
                                           thread_name_prefix="easel-png")
        return _png_pool


class PngJob(NamedTuple):
    """One PNG to write: the image, its path, and its text chunks (``PngInfo``; None: none)."""

    image: "Image"
    path: Path
    info: "PngInfo | None" = None


def save_pngs(jobs: Sequence[PngJob]) -> list[Path]:
    """Encode and write :class:`PngJob`\\ s as PNG files, in parallel threads.

    Every job is finished (written or failed) before this returns.

    Returns:
        The paths, in order.

    Raises:
        OSError: the first job's error (e.g. a full disk), after all jobs ended.
    """
    if len(jobs) == 1:
        image, path, info = jobs[0]
        image.save(path, format="PNG", pnginfo=info, **PNG_OPTIONS)
        return [path]
    futures = [_pool().submit(image.save, path, format="PNG", pnginfo=info, **PNG_OPTIONS)
               for image, path, info in jobs]
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
    return [path for _, path, _ in jobs]


def write_pngs(images: Sequence["Image"], output_dir: Path, seed: int, parameters: Callable[[int], str],
               params: Mapping[str, object]) -> list[Path]:
    """Save generated images as ``0.png`` … ``N-1.png`` with their generation parameters
    (encoded in parallel, see :func:`save_pngs`).

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

    jobs: list[PngJob] = []
    for i, image in enumerate(images):
        info = PngInfo()
        info.add_text("parameters", parameters(seed + i))
        info.add_text("easel", json.dumps({**params, "seed": seed + i}, sort_keys=True))
        jobs.append(PngJob(image, output_dir / f"{i}.png", info))
    return save_pngs(jobs)
