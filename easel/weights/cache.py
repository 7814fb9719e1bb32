"""Warm pipelines kept between tasks, and the LoRA adapters loaded into them.

- :class:`PipelineCache` maps a weights key to a loaded diffusers pipeline, bounded by a byte
  budget (the sum of parameter and buffer sizes) with least-recently-used eviction. A load counter
  per key lets tests assert that a LoRA change did not reload the base model.
- :class:`LoraState` loads each LoRA file once per pipeline as a named PEFT adapter (the name is
  derived from the file's content hash / catalog key), activates the requested set with
  ``set_adapters(names, weights)`` and disables LoRA entirely when none is requested. Switching
  adapters or scales never touches the base weights. Beyond ``max_resident`` adapters the least
  recently used is deleted. The state remembers what the modules hold, so a task that asks for
  the active set again makes no call at all (``set_adapters`` walks every LoRA layer: ~12 ms on
  the tiny SD, more on real networks); it is the only writer of a pipeline's adapters.

With ``hotswap_rank`` set (the FLUX tools), the state holds **one adapter slot** instead: the
first LoRA is loaded after ``enable_lora_hotswap(target_rank=hotswap_rank)``, and every later
LoRA is *hot-swapped* into that slot (``load_lora_weights(..., hotswap=True)``): its weights are
copied into the existing LoRA layers, so a ``torch.compile``-d transformer is not recompiled. A
LoRA that cannot be hot-swapped (it targets modules the slot does not, or its rank exceeds
``hotswap_rank``) replaces the slot by an ordinary unload + load, which is logged and counted.

Follows diffusers' PEFT integration (``load_lora_weights``, ``set_adapters``, ``delete_adapters``);
Kohya/A1111 LoRA files are converted by diffusers' own loaders.
"""
from __future__ import annotations

import gc
import hashlib
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, TypeVar, cast

from easel import metrics

from easel.weights.lora_formats import loadable


S = TypeVar("S")


def torch_modules(obj: Any) -> list:
    """The torch modules an entry holds: a pipeline's components, or the object itself (a component)."""
    components = getattr(obj, "components", None)
    if isinstance(components, dict):
        return [c for c in components.values() if hasattr(c, "parameters")]
    return [obj] if hasattr(obj, "parameters") else []


def module_bytes(pipe: Any) -> int:
    """Bytes of all parameters and buffers of a pipeline's torch modules (or of one module)."""
    total = 0
    for comp in torch_modules(pipe):
        total += sum(p.numel() * p.element_size() for p in comp.parameters())
        total += sum(b.numel() * b.element_size() for b in comp.buffers())
    return total


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".gguf", ".onnx")


def weights_bytes(path: Any) -> int:
    """Bytes of the weight files at ``path`` (a file, or every weight file under a folder): the
    estimate of a model's size before it is loaded; 0 when there is nothing to measure."""
    from pathlib import Path

    try:
        path = Path(path)
        if path.is_file():
            return path.stat().st_size
        return sum(f.stat().st_size for f in path.rglob("*") if f.suffix in WEIGHT_SUFFIXES and f.is_file())
    except (OSError, TypeError):
        return 0


def is_compiled(obj: Any) -> bool:
    """Whether any of ``obj``'s torch modules went through ``torch.compile`` (wrapped or in place)."""
    return any(hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) is not None
               for m in torch_modules(obj))


def release_device_memory(compiled: bool) -> None:
    """After an eviction: collect the dropped objects, drop ``torch.compile`` state when a compiled
    entry went (its guards and graphs keep references to the old modules; every compiled module
    recompiles at its next call), and return CUDA's cached blocks to the driver. Does nothing
    that needs CUDA when there is none."""
    gc.collect()
    import sys

    torch = sys.modules.get("torch")  # never import torch just to release memory
    if torch is None:
        return
    if compiled:
        try:
            torch._dynamo.reset()
        except Exception:  # an old or partial torch: nothing compiled to release
            pass
        gc.collect()
    from easel.weights.precision import cuda_available

    if cuda_available():
        torch.cuda.empty_cache()


def device_free_bytes() -> int | None:
    """Bytes this process could still allocate on its current CUDA device: what the driver
    reports free (``torch.cuda.mem_get_info``; memory that other processes hold, e.g. a second
    worker on the same GPU, is already taken out) plus what PyTorch's caching allocator holds
    reserved but unallocated. None without CUDA (torch not imported, or no device)."""
    import sys

    from easel.weights.precision import cuda_available

    torch = sys.modules.get("torch")  # never import torch just to ask
    if torch is None or not cuda_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return int(free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated())


class PipelineCache:
    """LRU cache of loaded pipelines within ``budget_bytes``.

    **Evict before load**: on a miss, least recently used entries are evicted until the expected
    size of the new one fits, and only then is it loaded, so the old and the new weights are
    never in memory together (no double peak). The expected size is the size the key had when it
    was last loaded, else the caller's estimate (the weights' bytes on disk, see
    :func:`weights_bytes`); if the loaded object is larger, more is evicted after the load.
    Evicted entries' memory is released (:func:`release_device_memory`).

    **Device memory actually free**: with a ``free_bytes`` probe that answers (CUDA:
    :func:`device_free_bytes`), a load also evicts until the probe shows room for the new weights
    plus ``headroom_bytes`` (activations), whatever the byte budget says: the budget is the
    operator's ceiling, the probe what the GPU really has left (another worker's models, the
    allocator's fragments). After a load, entries are evicted while less than the headroom is free.
    """

    def __init__(self, budget_bytes: int, headroom_bytes: int = 0,
                 free_bytes: Callable[[], int | None] = device_free_bytes):
        self.budget_bytes = budget_bytes
        self.headroom_bytes = headroom_bytes
        self.free_bytes = free_bytes
        self._items: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self.loads: dict[str, int] = {}
        self.evictions: list[str] = []  # keys in the order they were evicted
        self._sizes: dict[str, int] = {}  # measured size of every key loaded so far
        self._lock = threading.RLock()

    def get(self, key: str, loader: "Callable[[], S]", expected_bytes: int | None = None) -> "S":
        """Return the pipeline for ``key``, loading it with ``loader()`` on a miss.

        Least recently used pipelines are evicted until the new one fits the budget, before it is
        loaded when its size is known or ``expected_bytes`` estimates it (one pipeline larger than
        the whole budget is still kept, alone).
        """
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return cast(S, self._items[key][0])  # a key is always loaded by the same kind of loader
            expected = self._sizes.get(key) or expected_bytes or 0
            self._evict_until(expected, expected)
            began = time.monotonic()
            pipe = loader()
            metrics.model_loaded(key, time.monotonic() - began)
            size = module_bytes(pipe)
            self._evict_until(size, 0)  # the new weights are on the device already
            self._items[key] = (pipe, size)
            self._sizes[key] = size
            self.loads[key] = self.loads.get(key, 0) + 1
            metrics.cache_bytes(self.used_bytes)
            return pipe

    def _evict_until(self, incoming: int, incoming_device: int) -> None:
        """Evict least recently used entries until ``incoming`` more bytes fit the budget and the
        device has ``incoming_device`` + the headroom free (when the probe answers)."""
        compiled = False
        evicted = False

        def short_of_device() -> bool:
            free = self.free_bytes()
            return free is not None and free < incoming_device + self.headroom_bytes

        while self._items and (self.used_bytes + incoming > self.budget_bytes or short_of_device()):
            key, (obj, _) = self._items.popitem(last=False)
            compiled = compiled or is_compiled(obj)
            self.evictions.append(key)
            del obj
            evicted = True
            release_device_memory(compiled)  # before the probe is asked again
            compiled = False
        if evicted:
            metrics.cache_bytes(self.used_bytes)

    @property
    def used_bytes(self) -> int:
        return sum(size for _, size in self._items.values())

    def keys(self) -> list[str]:
        return list(self._items)

    def peek(self, key: str) -> object | None:
        """The resident object for ``key`` without loading or touching its LRU position."""
        with self._lock:
            item = self._items.get(key)
            return item[0] if item else None


def adapter_name(key: str) -> str:
    """A PEFT-safe adapter name for a LoRA weights key (no dots; stable for the same file)."""
    return "lora_" + hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class PipelineState:
    """What a tool remembers about one resident pipeline (kept beside it, never patched onto it).

    Attributes:
        base_scheduler: the checkpoint's own scheduler config, taken before any scheduler swap
            (every later scheduler is made ``from_config`` of it).
        compiled: its denoiser went through ``torch.compile``.
    """

    base_scheduler: dict[str, object] | None = None
    compiled: bool = False


class StateTable:
    """Typed state entries kept beside cached objects: ``(object, state class)`` → one instance of
    the class, made by calling it with no argument on first use. Held weakly by the object, so a
    pipeline evicted (or reloaded) starts clean, even if Python reuses the old object's ``id``."""

    def __init__(self) -> None:
        self._states: "weakref.WeakKeyDictionary[object, dict[type, object]]" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self, obj: object, kind: "type[S]") -> S:
        """The ``kind`` state of ``obj`` (created empty on first use)."""
        with self._lock:
            states = self._states.setdefault(obj, {})
            state = states.get(kind)
            if state is None:
                state = states[kind] = kind()
            assert isinstance(state, kind)
            return state


class LoraState:
    """The adapters loaded into one pipeline, and which are active at what scale."""

    SLOT = "easel_slot"

    def __init__(self, max_resident: int = 8, hotswap_rank: int | None = None):
        self.max_resident = max_resident
        self.hotswap_rank = hotswap_rank
        self._loaded: OrderedDict[str, None] = OrderedDict()
        self._slot_key: str | None = None  # the slot exists (an adapter structure is loaded)
        self._slot_state: tuple[str, float] | None = None  # what its weights hold now
        self.loads = 0
        self.hotswaps = 0
        self.adapter_sets = 0  # set_adapters calls (skipped when the requested set is already active)
        self.last_action = ""
        # (adapter names, weights) the modules hold now; None = unknown (forces set_adapters)
        self._active: tuple[tuple[str, ...], tuple[float, ...]] | None = None

    def apply(self, pipe: Any, loras: list[tuple[str, str, float]]) -> None:
        """Make exactly ``loras`` active on ``pipe``.

        Args:
            pipe: A diffusers pipeline with ``LoraLoaderMixin`` (SD, SDXL, Flux).
            loras: ``(key, path, scale)`` triples; ``key`` identifies the weights (same key, same
                adapter), ``scale`` is the adapter weight (any float; 0 disables its effect).

        Raises:
            ValueError: the file's keys match no layout diffusers knows for this pipeline, or
                match no module of it (e.g. an SDXL LoRA on SD 1.5); the message names the file.
                In hot-swap mode, also more than one LoRA.
        """
        if self.hotswap_rank:
            self._apply_slot(pipe, loras)
            return
        names = []
        for key, path, _ in loras:
            name = adapter_name(key)
            if name not in self._loaded:
                self._evict(pipe, keep={adapter_name(k) for k, _, _ in loras})
                self._active = None  # diffusers activates what it loads: the active set is unknown now
                self._load(pipe, key, path, name)
                self._loaded[name] = None
            self._loaded.move_to_end(name)
            names.append(name)
        wanted = (tuple(names), tuple(float(s) for _, _, s in loras))
        if wanted == self._active:  # what the modules already hold: set_adapters would cost ~12 ms for nothing
            self.last_action = "adapters unchanged"
            return
        self._active = None  # unknown until this change succeeds
        if not names:
            if self._loaded:
                pipe.disable_lora()
            self._active = wanted
            self.last_action = "LoRA disabled"
            return
        pipe.enable_lora()
        pipe.set_adapters(list(names), adapter_weights=list(wanted[1]))
        self.adapter_sets += 1
        self._active = wanted
        self.last_action = "adapters set"

    def _apply_slot(self, pipe: Any, loras: list[tuple[str, str, float]]) -> None:
        """One adapter slot whose *weights* change, never its structure or its Python-level scale.

        A compiled transformer guards on the adapter's ``scaling`` value and on the LoRA on/off
        flag, so changing either recompiles it. The slot therefore keeps adapter weight 1.0 and
        stays enabled. The requested scale is folded into the freshly hot-swapped ``lora_B``
        weights (``B ← scale · B``, exactly ``scale · ΔW``), and "no LoRA" zeroes them.
        """
        if len(loras) > 1:
            raise ValueError("hot-swap mode holds one LoRA at a time")
        if not loras:
            if self._slot_key is not None and self._slot_state is not None:
                _scale_lora_b(pipe, self.SLOT, 0.0)
                self._slot_state = None  # the slot keeps its structure; its weights are zero
            self.last_action = "no LoRA"
            return
        key, path, scale = loras[0]
        if (key, scale) == self._slot_state:
            self.last_action = "LoRA already resident"
            return
        self._slot_state = None  # unknown until this change succeeds: a failure must not look resident
        if self._slot_key is None:
            self._load_slot(pipe, key, path)
            self.last_action = "LoRA loaded into the adapter slot"
        else:
            try:
                # Zero the slot first: a LoRA without weights for some module (e.g. no text-encoder
                # keys) leaves that module's previous LoRA weights in place otherwise (diffusers only
                # swaps the components the new file has keys for).
                _scale_lora_b(pipe, self.SLOT, 0.0)
                with _quiet_hotswap_errors():  # a refused swap is handled below and logged as an action
                    pipe.load_lora_weights(loadable(path), adapter_name=self.SLOT, hotswap=True)
                self.hotswaps += 1
                metrics.lora_hotswapped()
                self.last_action = "LoRA hot-swapped into the resident adapter slot"
            except Exception as exc:
                # diffusers removes the slot when a hot-swap fails; load the LoRA as a fresh adapter
                reason = str(exc).splitlines()[0][:200]
                _cleanup_failed(pipe, self.SLOT)
                self._slot_key = None
                self._load_slot(pipe, key, path)
                self.last_action = f"LoRA not hot-swappable ({reason}); adapter slot reloaded"
        if self._slot_key is None:  # a new adapter: weight 1.0 once, the scale lives in its weights
            pipe.enable_lora()
            pipe.set_adapters([self.SLOT], adapter_weights=[1.0])
        self._slot_key = key
        _scale_lora_b(pipe, self.SLOT, float(scale))
        self._slot_state = (key, scale)

    def _load_slot(self, pipe: Any, key: str, path: str) -> None:
        """Load a fresh slot, prepared for compiled hot-swap every time (diffusers consumes the
        preparation at the first load, so a slot re-created after a non-hot-swappable LoRA would
        otherwise keep that LoRA's rank and Python-float scales, and later swaps would recompile)."""
        compiled = any(hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) is not None
                       for m in getattr(pipe, "components", {}).values())
        # a compiled transformer recompiles once for the new structure (counted as a reload), never again
        pipe.enable_lora_hotswap(target_rank=self.hotswap_rank, check_compiled="ignore" if compiled else "error")
        self._load(pipe, key, path, self.SLOT, covering=True)

    def _load(self, pipe: Any, key: str, path: str, name: str, covering: bool = False) -> None:
        """Load the LoRA file as a new adapter ``name``; on failure leave no half-loaded adapter.
        ``covering``: the hot-swap slot, padded to every block layer (:func:`covering_state_dict`)."""
        try:
            pipe.load_lora_weights(covering_state_dict(pipe, path) if covering else loadable(path), adapter_name=name)
        except Exception as exc:
            _cleanup_failed(pipe, name)
            raise ValueError(f"LoRA {key} could not be loaded into {type(pipe).__name__}: {exc}") from None
        if not _adapter_present(pipe, name):
            raise ValueError(f"LoRA {key} matches no module of {type(pipe).__name__}: "
                             "it was made for another model family or has an unknown key layout")
        self.loads += 1
        metrics.lora_loaded()

    def _evict(self, pipe: Any, keep: set[str]) -> None:
        while len(self._loaded) >= self.max_resident:
            victim = next((n for n in self._loaded if n not in keep), None)
            if victim is None:
                return
            pipe.delete_adapters(victim)
            del self._loaded[victim]
            self._active = None


# The layers a FLUX LoRA targets live in the transformer's blocks; the hot-swap slot covers all of them
SLOT_MODULE_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")


def covering_state_dict(pipe: Any, path: str) -> Any:
    """The LoRA at ``path`` as diffusers reads it, plus zero LoRA weights for every other
    ``Linear`` layer of the transformer's blocks (:data:`SLOT_MODULE_PREFIXES`), so the adapter
    slot it creates targets every layer a later LoRA may target.

    PEFT hot-swaps only into layers the resident adapter already has (a LoRA with weights for
    another layer is refused with "unexpected keys" and the slot must be reloaded, which recompiles
    a compiled transformer). Slots were shaped by the first LoRA: XLabs' RealismLora (the FLUX
    tool's default) has LoRA layers in the double blocks' attention only, so every LoRA reaching
    the single blocks (the Comics Factory style, any ai-toolkit or Kohya LoRA) fell back. The
    added layers hold ``lora_B = 0``, so they change nothing (``ΔW = B·A = 0``); they cost
    memory and time like a LoRA of that rank on those layers (at rank 128 in bfloat16, about
    1.4 GB for FLUX.1-dev). A pipeline without a ``transformer`` (or a file diffusers cannot read)
    gets :func:`loadable`'s value unchanged.
    """
    import torch

    transformer = getattr(pipe, "transformer", None)
    if transformer is None or not hasattr(pipe, "lora_state_dict"):
        return loadable(path)
    try:
        state, alphas = pipe.lora_state_dict(loadable(path), return_alphas=True)
    except Exception:
        return loadable(path)  # load_lora_weights gives diffusers' own error, which the caller reports
    prefix = "transformer."
    ranks = [v.shape[0] for k, v in state.items() if k.startswith(prefix) and k.endswith("lora_A.weight")]
    if not ranks:
        return loadable(path)
    rank = min(ranks)
    covered = {k[len(prefix):-len(".lora_A.weight")] for k in state if k.startswith(prefix) and k.endswith(".lora_A.weight")}
    ref = next(v for k, v in state.items() if k.endswith("lora_A.weight"))
    out = dict(state)
    for name, module in transformer.named_modules():
        # a layer PEFT has wrapped before (a slot reloaded after a failed swap) holds its Linear as base_layer
        name = name.removesuffix(".base_layer")
        if isinstance(module, torch.nn.Linear) and name.startswith(SLOT_MODULE_PREFIXES) and ".lora_" not in name \
                and name not in covered:
            covered.add(name)
            out[f"{prefix}{name}.lora_A.weight"] = torch.zeros(rank, module.in_features, dtype=ref.dtype)
            out[f"{prefix}{name}.lora_B.weight"] = torch.zeros(module.out_features, rank, dtype=ref.dtype)
    out.update(alphas or {})
    return out


class _quiet_hotswap_errors:
    """Silence diffusers' ``logger.error("Hotswapping ... was unsuccessful")`` around a hot-swap
    attempt: Easel handles the refusal (the slot is reloaded, :attr:`LoraState.last_action` says
    why, in the task's ``debugoutput``); an ERROR line on stderr would reach ``debugerror`` of a
    task that succeeded."""

    def __enter__(self):
        import logging

        self.logger = logging.getLogger("diffusers.loaders.peft")
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
        return False


def _scale_lora_b(pipe: Any, adapter: str, factor: float) -> None:
    """Multiply every ``lora_B`` weight of ``adapter`` in the pipeline's modules by ``factor`` in place."""
    import torch

    with torch.no_grad():
        for comp in getattr(pipe, "components", {}).values():
            if not hasattr(comp, "modules"):
                continue
            for module in comp.modules():
                lora_b = getattr(module, "lora_B", None)
                if lora_b is not None and hasattr(lora_b, "keys") and adapter in lora_b.keys():
                    lora_b[adapter].weight.mul_(factor)


def _adapter_present(pipe: Any, name: str) -> bool:
    try:
        return any(name in names for names in pipe.get_list_adapters().values())
    except Exception:
        return False


def _cleanup_failed(pipe: Any, name: str) -> None:
    try:
        if _adapter_present(pipe, name):
            pipe.delete_adapters(name)
    except Exception:
        pass
