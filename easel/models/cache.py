"""Warm pipelines kept between tasks, and the LoRA adapters loaded into them.

- :class:`PipelineCache` maps a weights key to a loaded diffusers pipeline, bounded by a byte
  budget (the sum of parameter and buffer sizes) with least-recently-used eviction. A load counter
  per key lets tests assert that a LoRA change did not reload the base model.
- :class:`LoraState` loads each LoRA file once per pipeline as a named PEFT adapter (the name is
  derived from the file's content hash / catalog key), activates the requested set with
  ``set_adapters(names, weights)`` and disables LoRA entirely when none is requested. Switching
  adapters or scales never touches the base weights. Beyond ``max_resident`` adapters the least
  recently used is deleted.

Follows diffusers' PEFT integration (``load_lora_weights``, ``set_adapters``, ``delete_adapters``);
Kohya/A1111 LoRA files are converted by diffusers' own loaders.
"""
from __future__ import annotations

import gc
import hashlib
import threading
from collections import OrderedDict
from typing import Any, Callable


def module_bytes(pipe: Any) -> int:
    """Bytes of all parameters and buffers of a pipeline's torch modules."""
    total = 0
    for comp in getattr(pipe, "components", {}).values():
        if hasattr(comp, "parameters"):
            total += sum(p.numel() * p.element_size() for p in comp.parameters())
            total += sum(b.numel() * b.element_size() for b in comp.buffers())
    return total


class PipelineCache:
    """LRU cache of loaded pipelines within ``budget_bytes``."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self.loads: dict[str, int] = {}
        self._lock = threading.RLock()

    def get(self, key: str, loader: Callable[[], Any]) -> Any:
        """Return the pipeline for ``key``, loading it with ``loader()`` on a miss.

        Least recently used pipelines are evicted until the new one fits the budget (one pipeline
        larger than the whole budget is still kept, alone).
        """
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
            pipe = loader()
            size = module_bytes(pipe)
            while self._items and self.used_bytes + size > self.budget_bytes:
                self._items.popitem(last=False)
                gc.collect()
            self._items[key] = (pipe, size)
            self.loads[key] = self.loads.get(key, 0) + 1
            return pipe

    @property
    def used_bytes(self) -> int:
        return sum(size for _, size in self._items.values())

    def keys(self) -> list[str]:
        return list(self._items)


def adapter_name(key: str) -> str:
    """A PEFT-safe adapter name for a LoRA weights key (no dots; stable for the same file)."""
    return "lora_" + hashlib.sha256(key.encode()).hexdigest()[:16]


class LoraState:
    """The adapters loaded into one pipeline, and which are active at what scale."""

    def __init__(self, max_resident: int = 8):
        self.max_resident = max_resident
        self._loaded: OrderedDict[str, None] = OrderedDict()
        self.loads = 0

    def apply(self, pipe: Any, loras: list[tuple[str, str, float]]) -> None:
        """Make exactly ``loras`` active on ``pipe``.

        Args:
            pipe: A diffusers pipeline with ``LoraLoaderMixin`` (SD, SDXL, Flux).
            loras: ``(key, path, scale)`` triples; ``key`` identifies the weights (same key, same
                adapter), ``scale`` is the adapter weight (any float; 0 disables its effect).

        Raises:
            ValueError: the file's keys match no layout diffusers knows for this pipeline, or
                match no module of it (e.g. an SDXL LoRA on SD 1.5); the message names the file.
        """
        names = []
        for key, path, _ in loras:
            name = adapter_name(key)
            if name not in self._loaded:
                self._evict(pipe, keep={adapter_name(k) for k, _, _ in loras})
                try:
                    pipe.load_lora_weights(path, adapter_name=name)
                except Exception as exc:
                    _cleanup_failed(pipe, name)
                    raise ValueError(f"LoRA {key} could not be loaded into {type(pipe).__name__}: {exc}") from None
                if not _adapter_present(pipe, name):
                    raise ValueError(f"LoRA {key} matches no module of {type(pipe).__name__}: "
                                     "it was made for another model family or has an unknown key layout")
                self._loaded[name] = None
                self.loads += 1
            self._loaded.move_to_end(name)
            names.append(name)
        if not names:
            if self._loaded:
                pipe.disable_lora()
            return
        pipe.enable_lora()
        pipe.set_adapters(names, adapter_weights=[float(s) for _, _, s in loras])

    def _evict(self, pipe: Any, keep: set[str]) -> None:
        while len(self._loaded) >= self.max_resident:
            victim = next((n for n in self._loaded if n not in keep), None)
            if victim is None:
                return
            pipe.delete_adapters(victim)
            del self._loaded[victim]


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
