"""Weights for tools: catalog resolution (``sources``), warm pipelines and LoRA adapters
(``cache``), safe downloads (``fetch``), the offline tiny models (``tiny``, ``tiny_sdxl``,
``tiny_faces``) and InstantID's pieces (``instantid``: IP-Adapter and IdentityNet pipeline;
``faces``: insightface face analysis; ``conditions``: canny / depth / openpose images)."""
from __future__ import annotations

from typing import Any, Callable

from easel.catalog import ModelCatalog
from easel.config import Settings

from .cache import LoraState, PipelineCache
from .sources import ModelSources, Weights

__all__ = ["ModelManager", "ModelSources", "Weights", "PipelineCache", "LoraState", "dtype_kwargs"]


def dtype_kwargs(dtype: Any) -> dict:
    """``from_pretrained`` / ``from_single_file`` keyword for a torch dtype: ``dtype`` on diffusers
    versions that renamed it (they warn on ``torch_dtype``), ``torch_dtype`` on older ones."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


class ModelManager:
    """What a tool needs to get weights: sources, the warm pipeline cache, LoRA state per pipeline.

    One instance lives in each worker process for its whole life, so pipelines stay warm.
    """

    def __init__(self, settings: Settings, catalog: ModelCatalog):
        self.settings = settings
        self.catalog = catalog
        self.sources = ModelSources(settings, catalog)
        self.pipelines = PipelineCache(settings.pipeline_cache_bytes)
        self._loras: dict[int, LoraState] = {}

    def pipeline(self, key: str, loader: Callable[[], Any]) -> Any:
        """The warm pipeline for ``key`` (loaded by ``loader`` on first use or after eviction)."""
        return self.pipelines.get(key, loader)

    def loras(self, pipe: Any, hotswap: bool = False) -> LoraState:
        """The :class:`LoraState` of a loaded pipeline object.

        Args:
            hotswap: One hot-swapped adapter slot (rank up to ``Settings.lora_hotswap_rank``)
                instead of several resident adapters; fixed by the first call for a pipeline.
        """
        state = self._loras.get(id(pipe))
        if state is None:
            rank = self.settings.lora_hotswap_rank if hotswap else None
            state = self._loras[id(pipe)] = LoraState(self.settings.max_resident_loras, hotswap_rank=rank)
        return state
