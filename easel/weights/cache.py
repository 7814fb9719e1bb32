"""Warm pipelines kept between tasks, and the typed state kept beside them.

- :class:`PipelineCache` maps a weights key to a loaded diffusers pipeline, bounded by a byte
  budget (the sum of parameter and buffer sizes) with least-recently-used eviction. A load counter
  per key lets tests assert that a LoRA change did not reload the base model.
- :class:`StateTable` keeps typed state entries beside cached objects (:class:`PipelineState`:
  what a tool remembers about a resident pipeline), never patched onto them.

The LoRA adapters of a resident pipeline are :class:`easel.weights.adapters.LoraState`'s.
"""
from __future__ import annotations

import gc
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from os import PathLike
from typing import TYPE_CHECKING, Callable, NamedTuple, TypeVar, cast

from easel import metrics
from easel.malloc import release_free_heap
# the adapters' state moved to its own module; its old import path stays valid
from easel.weights.adapters import SLOT_MODULE_PREFIXES, LoraState  # noqa: F401

if TYPE_CHECKING:  # pragma: no cover
    import torch

S = TypeVar("S")


def torch_modules(obj: object) -> list[torch.nn.Module]:
    """The torch modules an entry holds: a pipeline's components, or the object itself (a component).
    ``obj`` is anything the cache holds (a diffusers pipeline, a torch module, a typed entry); an
    object without parameters holds none."""
    components = getattr(obj, "components", None)
    if isinstance(components, dict):
        return [c for c in components.values() if hasattr(c, "parameters")]
    return [obj] if hasattr(obj, "parameters") else []


def module_bytes(pipe: object) -> int:
    """Bytes of all parameters and buffers of a pipeline's torch modules (or of one module)."""
    total = 0
    for comp in torch_modules(pipe):
        total += sum(p.numel() * p.element_size() for p in comp.parameters())
        total += sum(b.numel() * b.element_size() for b in comp.buffers())
    return total


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".gguf", ".onnx")


def weights_bytes(path: str | PathLike[str] | None) -> int:
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


def is_compiled(obj: object) -> bool:
    """Whether any of ``obj``'s torch modules went through ``torch.compile`` (wrapped or in place)."""
    return any(hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) is not None
               for m in torch_modules(obj))


def release_device_memory(compiled: bool) -> None:
    """After an eviction: collect the dropped objects, give the freed CPU memory back to the kernel
    (:func:`easel.malloc.release_free_heap`: a worker's heap keeps it otherwise), drop
    ``torch.compile`` state when a compiled entry went (its guards and graphs keep references to
    the old modules; every compiled module recompiles at its next call), and return CUDA's cached
    blocks to the driver. Does nothing that needs CUDA when there is none."""
    gc.collect()
    import sys

    torch = sys.modules.get("torch")  # never import torch just to release memory
    if torch is None:
        release_free_heap()
        return
    if compiled:
        try:
            torch._dynamo.reset()
        except Exception:  # an old or partial torch: nothing compiled to release
            pass
        gc.collect()
    release_free_heap()
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


class CacheEntry(NamedTuple):
    """One resident object of :class:`PipelineCache` and its measured size (bytes of parameters
    and buffers, :func:`module_bytes`)."""

    obj: object
    size: int


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
        self._items: OrderedDict[str, CacheEntry] = OrderedDict()
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
                return cast(S, self._items[key].obj)  # a key is always loaded by the same kind of loader
            expected = self._sizes.get(key) or expected_bytes or 0
            self._evict_until(expected, expected)
            began = time.monotonic()
            pipe = loader()
            metrics.model_loaded(key, time.monotonic() - began)
            size = module_bytes(pipe)
            self._evict_until(size, 0)  # the new weights are on the device already
            self._items[key] = CacheEntry(pipe, size)
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
        return sum(entry.size for entry in self._items.values())

    def keys(self) -> list[str]:
        return list(self._items)

    def peek(self, key: str) -> object | None:
        """The resident object for ``key`` without loading or touching its LRU position."""
        with self._lock:
            item = self._items.get(key)
            return item.obj if item else None


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
