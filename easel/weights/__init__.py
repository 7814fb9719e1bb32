"""Weights for tools: catalog resolution (``sources``), warm pipelines, derived pipelines,
components and adapter state (``cache``), safe downloads (``fetch``) and the offline tiny models
(``tiny``, ``tiny_sdxl``, ``tiny_faces``), and InstantID's pieces (``instantid``: IP-Adapter and
IdentityNet pipeline; ``faces``: insightface face analysis; ``conditions``: canny / depth /
openpose images).

:class:`ModelManager` is the typed model service a tool receives as ``ctx.models``. A tool asks it
for *what* it needs (a checkpoint of a kind, a LoRA with its scale, a pipeline, a derived pipeline,
a component, the adapter state of a pipeline) and never sees settings or cache keys.
"""
from __future__ import annotations

import time
import weakref
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Generic, Mapping, TypeVar

from easel.catalog import CatalogError, ModelCatalog, ModelEntry
from easel.config import Settings

from easel.weights.adapters import LoraLoad, LoraPipeline, LoraState
from easel.weights.cache import PipelineCache, StateTable, torch_modules, weights_bytes
from easel.weights.precision import Precision, precision as _precision
from easel.weights.sources import ModelSources, Weights

if TYPE_CHECKING:
    import torch

    from easel.storage import Storage

S = TypeVar("S")

__all__ = ["ModelManager", "ModelSources", "Weights", "PipelineCache", "LoraState", "LoraLoad", "dtype_kwargs",
           "ModelError", "Checkpoint", "LoraChoice", "ControlNetChoice", "Loaded", "RuntimeOptions", "Precision"]


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained`` / ``from_single_file`` keyword for a torch dtype: ``dtype`` on diffusers
    versions that renamed it (they warn on ``torch_dtype``), ``torch_dtype`` on older ones."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


class ModelError(ValueError):
    """A model request a tool cannot satisfy (wrong kind, unknown id, no source, failed download).
    The message names the request field and goes to the task's ``debugerror``."""


@dataclass(frozen=True)
class Checkpoint:
    """A resolved catalog checkpoint: its entry and local weights."""

    entry: ModelEntry
    weights: Weights

    @property
    def label(self) -> str:
        return self.entry.label


@dataclass(frozen=True)
class LoraChoice:
    """One LoRA to apply: ``key`` identifies the weights (same key, same adapter), ``scale`` is the
    adapter weight (PEFT's ``set_adapters`` weight; 0 disables its effect), ``label`` is for logs."""

    key: str
    path: str
    scale: float
    label: str
    layout: str = ""  # the file's key layout when known (peft, kohya, xlabs, bfl)

    @property
    def triple(self) -> LoraLoad:
        """``LoraLoad(key, path, scale)`` as :meth:`LoraState.apply` takes it."""
        return LoraLoad(self.key, self.path, self.scale)


@dataclass(frozen=True)
class ControlNetChoice:
    """A chosen ControlNet: catalog ``id``, local ``weights``, conditioning ``scale``, the
    ``condition`` image it reads (``canny``, ``depth``, ``openpose``) and a ``label`` for logs."""

    id: str
    weights: Weights
    scale: float
    condition: str
    label: str


T = TypeVar("T")


@dataclass(frozen=True)
class Loaded(Generic[T]):
    """An object from the warm cache (a pipeline, a typed entry, a component): ``fresh`` if this
    call loaded it, in ``seconds``."""

    obj: T
    fresh: bool
    seconds: float

    def describe(self, label: str) -> str:
        """A ``debugoutput`` line: ``<label>: resident, reused`` or ``<label>: loaded in 1.23 s``."""
        return f"{label}: " + (f"loaded in {self.seconds:.2f} s" if self.fresh else "resident, reused")


@dataclass(frozen=True)
class RuntimeOptions:
    """Operator choices a tool may follow (from ``Settings``): ``torch_compile`` the denoiser,
    force ``cpu_offload``."""

    torch_compile: bool = False
    cpu_offload: bool = False


def _scale(entry: ModelEntry, inputs: "Mapping[str, object]") -> float:
    """The scale of a selected model: its ``generatesettings`` value in the validated inputs, else
    the catalog default; 1.0 for an entry without one."""
    if not entry.generatesettings:
        return 1.0
    setting = entry.generatesettings[0]
    value = inputs.get(setting["id"], setting.get("value", 1.0))
    return float(value) if isinstance(value, (int, float, str)) else 1.0


class ModelManager:
    """The model services of one worker process: weights, warm cache, derived pipelines,
    components, adapter state. One instance lives for the worker's whole life, so everything
    stays warm between tasks.

    Everything resident (pipelines, derived pipelines, components) shares one LRU byte budget
    (``Settings.weights.pipeline_cache_bytes``).
    """

    def __init__(self, settings: Settings, catalog: ModelCatalog, storage: "Storage | None" = None):
        """``storage`` keeps fetched LoRAs (default: the one ``settings.storage.storage`` names).
        Keeps only ``settings.weights``; the sources keep their own parts (:class:`ModelSources`)."""
        self.weights = settings.weights
        self.catalog = catalog
        self.sources = ModelSources(settings, catalog, storage)
        self.pipelines = PipelineCache(self.weights.pipeline_cache_bytes, self.weights.device_memory_headroom_bytes)
        self.options = RuntimeOptions(torch_compile=settings.weights.torch_compile, cpu_offload=settings.weights.cpu_offload)
        # adapter state lives with the module that holds the adapters (a pipeline's UNet or
        # transformer): a reloaded module is a new key, a module shared by two pipelines one key
        self._adapters: "weakref.WeakKeyDictionary[object, LoraState]" = weakref.WeakKeyDictionary()
        self._states = StateTable()

    @property
    def tiny(self) -> bool:
        """Whether this worker runs the offline tiny models (``--model-source tiny``): tools that
        size their work to the model (IC-Light, InstantID) use 1/8 of the reference sizes."""
        return self.weights.model_source == "tiny"

    def state(self, obj: object, kind: "type[S]") -> "S":
        """The typed state ``kind`` (a class made with no argument, e.g.
        :class:`easel.weights.cache.PipelineState`) a tool keeps beside a cached object ``obj``:
        created on first use, gone with the object (an evicted pipeline's state goes with it)."""
        return self._states.get(obj, kind)

    def precision(self, kind: str) -> Precision:
        """Device and dtypes of a ``kind`` of pipeline in this worker (``sd15``, ``sdxl``,
        ``instantid``, ``flux``, ``ic-light``, ``condition``, ``matting``): the catalog's half
        dtypes on CUDA; on the CPU float32, or the same half dtypes with
        ``Settings.weights.cpu_precision = "half"`` (:func:`easel.weights.precision.precision`).

        Raises:
            ValueError: an unknown kind.
        """
        return _precision(kind, self.weights.cpu_precision)

    # -- weights ------------------------------------------------------------------------------

    def entry(self, model_id: str, field: str, kinds: tuple[str, ...]) -> ModelEntry:
        """The catalog entry of ``model_id``, which must be of one of ``kinds``.

        Raises:
            ModelError: unknown id, or another kind (the message names ``field``).
        """
        try:
            entry = self.catalog.get(model_id)
        except KeyError:
            raise ModelError(f"{field}: model {model_id!r} is not in this server's catalog") from None
        if entry.kind not in kinds:
            raise ModelError(f"{field} {entry.id} ({entry.label}) is a {entry.kind} model; this tool takes "
                             f"{' or '.join(kinds)}")
        return entry

    def checkpoint(self, model_id: str, field: str, kinds: tuple[str, ...] = ("sd15",)) -> Checkpoint:
        """Resolve a checkpoint id to local weights (downloading on first use in hub mode).

        Raises:
            ModelError: wrong kind, unknown id, no configured source, or a failed download.
        """
        entry = self.entry(model_id, field, kinds)
        try:
            return Checkpoint(entry, self.sources.checkpoint(entry))
        except CatalogError as exc:
            raise ModelError(f"{field}: {exc}") from None

    def base_checkpoint(self, tool: str, kinds: tuple[str, ...]) -> Checkpoint:
        """The checkpoint a tool without a model selector runs: its catalog file's ``base_model``.

        Raises:
            ModelError: as :meth:`checkpoint` (the message names the tool).
        """
        from easel.catalog import load_tools

        return self.checkpoint(load_tools()[tool].base_model or "", f"base model of {tool}", kinds)

    def lora(self, model_id: str, field: str, kind: str, inputs: "Mapping[str, object]") -> LoraChoice:
        """A catalog LoRA with its scale: **the one place of the scale convention**.

        A LoRA entry with ``generatesettings`` takes its scale from the validated input of that
        setting's id (the request's value, else the catalog default, put there by
        ``ToolSpec.validate``); an entry without one has scale 1.0.

        Raises:
            ModelError: wrong kind, unknown id, no source.
        """
        entry = self.entry(model_id, field, (kind,))
        scale = _scale(entry, inputs)
        try:
            w = self.sources.lora(entry)
        except CatalogError as exc:
            raise ModelError(f"{field}: {exc}") from None
        return LoraChoice(f"{entry.id}:{w.key}", str(w.path), scale, entry.label)

    def component_weights(self, model_id: str, kinds: tuple[str, ...]) -> tuple[ModelEntry, Weights]:
        """The entry and local weights of a component (IC-Light offset, matting network...).

        Raises:
            ModelError: as :meth:`checkpoint`.
        """
        entry = self.entry(model_id, "component", kinds)
        try:
            return entry, self.sources.component(entry)
        except CatalogError as exc:
            raise ModelError(f"{entry.label}: {exc}") from None

    def controlnet(self, model_id: str, field: str, scales: "Mapping[str, object]") -> ControlNetChoice:
        """A catalog ControlNet (kind ``sdxl-controlnet`` with a ``condition``) with its
        conditioning scale (its ``generatesettings`` value, as :meth:`lora`).

        Raises:
            ModelError: unknown id, another kind, no condition, no source.
        """
        entry = self.entry(model_id, field, ("sdxl-controlnet",))
        if not entry.condition:
            raise ModelError(f"{field} {model_id} ({entry.label}) is not an openpose/depth/canny SDXL ControlNet")
        _, weights = self.component_weights(model_id, ("sdxl-controlnet",))
        return ControlNetChoice(entry.id, weights, _scale(entry, scales), entry.condition, entry.label)

    def face_pack(self) -> Weights:
        """The insightface face-analysis pack (``models/antelopev2/`` under its root), checked.

        Raises:
            ModelError: the pack is missing or incomplete, its licence not accepted, or its download failed.
        """
        from easel.pipelines.faces import FacePackMissing, check_pack

        try:
            root = self.sources.face_root()
            check_pack(root)
        except (CatalogError, FacePackMissing) as exc:
            raise ModelError(str(exc)) from None
        return Weights("folder", root, key=f"faces:{root}")

    # -- the warm cache -----------------------------------------------------------------------

    def pipeline(self, key: str, loader: Callable[[], T]) -> T:
        """The warm object for a raw cache ``key`` (loaded by ``loader`` on first use or after eviction).
        Tools use :meth:`base_pipeline`, :meth:`derived_pipeline` and :meth:`component` instead."""
        return self.pipelines.get(key, loader)

    def _get(self, key: str, loader: Callable[[], T], weights: Weights | None = None) -> Loaded[T]:
        fresh = self.pipelines.peek(key) is None
        t0 = time.perf_counter()
        # evict before load: the size to make room for is estimated from the weights on disk
        expected = (lambda: weights_bytes(weights.path)) if fresh and weights is not None else None
        obj = self.pipelines.get(key, loader, expected() if expected else None)
        return Loaded(obj, fresh, time.perf_counter() - t0)

    def base_pipeline(self, family: str, weights: Weights, loader: Callable[[], T]) -> Loaded[T]:
        """The plain pipeline of a checkpoint (one per family and weights), e.g. the SD tool's."""
        return self._get(f"{family}:{weights.key}", loader, weights)

    def derived_pipeline(self, family: str, weights: Weights, transform: str, loader: Callable[[], T]) -> Loaded[T]:
        """A pipeline built from a base checkpoint plus a transformation (e.g. ``iclight-fbc:<offset key>``).

        Cached under its own key (``<family>:<weights>+<transform>``) and counted in the budget.
        ``loader`` must build its own modules from the weights (never take the plain pipeline's):
        a derived entry that shares a torch module with the resident plain pipeline is refused, so
        a transformation can never leak into the base model other tools use.

        Raises:
            RuntimeError: the loader returned modules shared with the plain pipeline.
        """
        loaded = self._get(f"{family}:{weights.key}+{transform}", loader, weights)
        if loaded.fresh:
            plain = self.pipelines.peek(f"{family}:{weights.key}")
            if plain is not None:
                shared = {id(m) for m in torch_modules(plain)} & {id(m) for m in torch_modules(loaded.obj)}
                if shared:
                    raise RuntimeError(f"derived pipeline {transform} shares modules with the plain {family} pipeline")
        return loaded

    def component(self, kind: str, weights: Weights, loader: Callable[[Weights], T]) -> Loaded[T]:
        """An auxiliary network (matting, face analysis, ControlNet, IP-Adapter...) loaded once per
        worker by ``loader(weights)``, cached and budgeted like pipelines."""
        return self._get(f"component:{kind}:{weights.key}", lambda: loader(weights), weights)

    def loads(self) -> dict[str, int]:
        """How many times each cache key was loaded in this worker (for logs and tests)."""
        return dict(self.pipelines.loads)

    # -- adapters -----------------------------------------------------------------------------

    def adapters(self, pipe: LoraPipeline, hotswap: bool = False) -> LoraState:
        """The :class:`LoraState` of the module holding ``pipe``'s adapters (its UNet or transformer).

        The state belongs to that module object: a pipeline reloaded after eviction has new modules
        and starts clean even if Python reuses the old pipeline's ``id``; two pipelines sharing a
        denoiser share its state (the adapters live in it).

        Args:
            hotswap: One hot-swapped adapter slot (rank up to ``Settings.weights.lora_hotswap_rank``)
                instead of several resident adapters; fixed by the first call for a module.
        """
        module = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None) or pipe
        state = self._adapters.get(module)
        if state is None:
            rank = self.weights.lora_hotswap_rank if hotswap else None
            state = self._adapters[module] = LoraState(self.weights.max_resident_loras, hotswap_rank=rank)
        return state

    def private_lora(self, value: str, field: str, family: str, input_file: Callable[[str], Path]) -> LoraChoice | None:
        """A user's own LoRA at scale 1.0: ``upload:<name>`` (a multipart file, via ``input_file``)
        or an ``http(s)`` URL (the safe fetcher). None for an empty value.

        Raises:
            ValueError: (``FetchError``, ``LoraFormatError``) a refused URL or file, or a LoRA made
                for another family than ``family`` (``sd`` or ``flux``); the message names ``field``.
        """
        from easel.net.fetch import check_safetensors
        from easel.weights.lora_formats import require_family

        value = (value or "").strip()
        if not value:
            return None
        if value.startswith("upload:"):
            path = input_file(value)
            check_safetensors(path)
            key = f"upload:{path.name}"
        else:
            w = self.sources.lora_from_url(value)
            path, key = w.path, w.key
        layout = require_family(path, family, field)
        return LoraChoice(key, str(path), 1.0, value, layout.layout)
