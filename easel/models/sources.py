"""Resolving a catalog entry (or a user URL) to weights on local disk.

Two sources, chosen by ``Settings.model_source``:

- ``tiny``: every id resolves to the offline tiny model of its family, in the same on-disk format
  as the real entry (a Hub repo → tiny diffusers folder; a single-file URL → tiny single-file
  checkpoint; LoRAs → a tiny Kohya- or PEFT-layout file). The tiny models are written on first use.
- ``random``: every id resolves to a random-weight network of its family at the published size
  (or ``Settings.random_model_size="small"``), written once as a diffusers folder under
  ``<data_dir>/models/random`` on the device the worker runs on (``easel.models.fullsize``);
  LoRAs resolve to random LoRAs of rank 16 over those networks. For speed and memory work.
- ``hub``: Hub repos download with ``huggingface_hub`` into ``<data_dir>/models/hub`` on first use;
  ``url`` sources go through the safe fetcher. Offline, the error says so.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from easel.catalog import CatalogError, ModelCatalog, ModelEntry
from easel.config import Settings
from easel.storage import Storage, create_storage

from .fetch import FetchPolicy, fetch_safetensors
from .tiny import make_tiny


@dataclass(frozen=True)
class Weights:
    """Local weights: ``format`` is ``diffusers`` (a folder), ``single_file`` or ``lora`` (a file).

    ``config`` is, for single files, a local diffusers folder whose configs describe the
    architecture (tiny models only; real checkpoints let diffusers infer it).
    """

    format: str
    path: Path
    config: Path | None = None
    key: str = ""


class ModelSources:
    """Turn catalog entries and LoRA URLs into :class:`Weights` according to the settings."""

    def __init__(self, settings: Settings, catalog: ModelCatalog, storage: "Storage | None" = None):
        """``storage`` keeps fetched weights (default: the one ``settings.storage`` names)."""
        self.settings = settings
        self.catalog = catalog
        self._storage = storage
        self._tiny_lock = threading.Lock()
        self._tiny: dict[str, Path] | None = None
        self._random: dict[str, Path] = {}

    @property
    def lora_policy(self) -> FetchPolicy:
        s = self.settings
        return FetchPolicy(allow=s.fetch_allow, max_bytes=s.lora_max_bytes,
                           connect_timeout=s.fetch_connect_timeout, read_timeout=s.fetch_read_timeout,
                           total_timeout=s.fetch_total_timeout_seconds)

    def tiny(self) -> dict[str, Path]:
        """Paths of the tiny models, writing them under ``<data_dir>/models/tiny`` if needed."""
        with self._tiny_lock:
            if self._tiny is None:
                self._tiny = make_tiny(self.settings.models_dir / "tiny")
            return self._tiny

    def random(self, family: str) -> Path:
        """The random-weight pipeline folder of ``family`` (written on first use, on the GPU when
        there is one, in the dtype the worker loads it with)."""
        from .fullsize import FAMILIES, make_random

        if family not in FAMILIES:
            raise CatalogError(f"no random full-size model exists for the {family} family")
        with self._tiny_lock:
            if family not in self._random:
                from .precision import precision

                where = precision(family, self.settings.cpu_precision)
                self._random[family] = make_random(self.settings.models_dir / "random", family,
                                                   self.settings.random_model_size, device=where.device,
                                                   dtype=where.dtype)
            return self._random[family]

    def checkpoint(self, entry: ModelEntry) -> Weights:
        """Weights of a checkpoint entry (kind sd15/sdxl/flux).

        Raises:
            CatalogError: unknown source (hub mode), a family without a tiny model, or a failed download.
        """
        if self.settings.model_source == "random":
            folder = self.random(entry.family)
            return Weights("diffusers", folder, key=f"random:{folder.name}")
        if self.settings.model_source == "tiny":
            tiny = self.tiny()
            if entry.family == "flux":
                return Weights("diffusers", tiny["flux"], key="tiny-flux")
            if entry.family not in ("sd15", "sdxl"):
                raise CatalogError(f"no tiny model exists yet for the {entry.family} family (catalog id {entry.id})")
            fam = entry.family
            source = entry.source or {}
            if source.get("type") == "url" or source.get("weight_name"):
                return Weights("single_file", tiny[f"{fam}-single-file"], config=tiny[fam], key=f"tiny-{fam}-single")
            return Weights("diffusers", tiny[fam], key=f"tiny-{fam}")
        source = self.catalog.require_source(entry)
        if source["type"] == "hf":
            if source.get("weight_name"):
                return Weights("single_file", self._hub_file(source), key=f"hf:{source['repo']}/{source['weight_name']}")
            return Weights("diffusers", self._hub_snapshot(source), key=f"hf:{source['repo']}")
        if source["type"] == "url":
            path = self._fetch(source["url"])
            return Weights("single_file", path, key=f"file:{path.name}")
        raise CatalogError(f"catalog id {entry.id}: unknown source type {source.get('type')!r} (use 'hf' or 'url')")

    def lora(self, entry: ModelEntry) -> Weights:
        """Weights of a LoRA entry.

        Raises:
            CatalogError: as for :meth:`checkpoint`.
        """
        if self.settings.model_source == "random":
            from .fullsize import lora_paths

            folder = self.random(entry.family)
            paths = lora_paths(folder, entry.family)
            path = paths.get(entry.lora_format or "", paths["peft"])
            return Weights("lora", path, key=f"random:{folder.name}/{path.name}")
        if self.settings.model_source == "tiny":
            tiny = self.tiny()
            if entry.family not in ("sd15", "sdxl", "flux"):
                raise CatalogError(f"no tiny model exists yet for the {entry.family} family (catalog id {entry.id})")
            # The entry's known layout, else: community LoRAs (unknown or URL sources) ship in
            # Kohya layout, Hub ones in PEFT layout.
            layout = entry.lora_format or ("peft" if (entry.source or {}).get("type") == "hf" else "kohya")
            name = f"{entry.family}-lora-{layout}"
            if name not in tiny:
                raise CatalogError(f"no tiny {entry.family} LoRA in the {layout} layout (catalog id {entry.id})")
            return Weights("lora", tiny[name], key=f"tiny-{name}")
        source = self.catalog.require_source(entry)
        if source["type"] == "hf":
            path = self._hub_file({**source, "weight_name": source.get("weight_name") or "pytorch_lora_weights.safetensors"})
        elif source["type"] == "url":
            path = self._fetch(source["url"])
        else:
            raise CatalogError(f"catalog id {entry.id}: unknown source type {source.get('type')!r}")
        return Weights("lora", path, key=f"file:{path.name}")

    def component(self, entry: ModelEntry) -> Weights:
        """Weights of a component entry: an IC-Light offset (``sd15-iclight``) or RMBG-1.4
        (``matting``), one ``.safetensors`` file each; an SDXL ControlNet or condition estimator
        (``diffusers``: a folder ``from_pretrained`` reads); or InstantID's IP-Adapter (one file).

        Hub sources: a repo folder (``subfolder`` selects e.g. IdentityNet's ``ControlNetModel/``),
        or one file with ``weight_name`` (IP-Adapter ``ip-adapter.bin``, read with
        ``torch.load(weights_only=True)``; IC-Light and RMBG default to ``model.safetensors``).
        Tiny mode: the tiny model named by the entry's ``tiny`` (or its kind's).

        Raises:
            CatalogError: no tiny stand-in, unknown source, or a failed download.
        """
        single_file = entry.kind in ("sd15-iclight", "matting")
        if self.settings.model_source == "tiny":
            tiny = self.tiny()
            name = entry.tiny or {"sd15-iclight": "iclight-fbc", "matting": "rmbg"}.get(entry.kind)
            if name not in tiny:
                raise CatalogError(f"no tiny model stands in for catalog id {entry.id} ({entry.label})")
            path = tiny[name]
            return Weights("diffusers" if path.is_dir() else "file", path, key=f"tiny-{name}")
        source = self.catalog.require_source(entry)
        if source["type"] == "url" and single_file:
            path = self._fetch(source["url"])
            return Weights("file", path, key=f"file:{path.name}")
        if source["type"] != "hf":
            raise CatalogError(f"catalog id {entry.id}: unknown source type {source.get('type')!r} for a component")
        if source.get("weight_name") or single_file:
            path = self._hub_file({**source, "weight_name": source.get("weight_name") or "model.safetensors"},
                                  suffixes=(".safetensors",) if single_file else (".safetensors", ".bin"))
            return Weights("file", path, key=f"hf:{source['repo']}/{path.name}")
        folder = self._hub_snapshot(source, patterns=source.get("allow_patterns"))
        if source.get("subfolder"):
            folder = folder / source["subfolder"]
        return Weights("diffusers", folder, key=f"hf:{source['repo']}/{source.get('subfolder', '')}")

    def face_root(self) -> Path:
        """The insightface ``root`` whose ``models/antelopev2/`` holds the face-analysis pack.

        Tiny mode: the tiny ONNX pack. Otherwise ``<data_dir>/models/insightface``, where the
        operator places the pack by hand (its licence is non-commercial; see
        ``easel.models.faces.PLACEMENT``); :class:`easel.models.faces.FaceAnalyzer` checks it.
        """
        if self.settings.model_source == "tiny":
            return self.tiny()["faces"]
        return self.settings.models_dir / "insightface"

    def lora_from_url(self, url: str) -> Weights:
        """Fetch a user's LoRA URL with the safe fetcher (in every model-source mode).

        Raises:
            easel.models.fetch.FetchError: refused URL or content.
        """
        path = self._fetch(url)
        return Weights("lora", path, key=f"file:{path.name}")

    # -- helpers ------------------------------------------------------------------------------

    @property
    def storage(self) -> "Storage":
        if self._storage is None:
            self._storage = create_storage(self.settings)
        return self._storage

    def _fetch(self, url: str) -> Path:
        """A URL's weights through the storage's ``fetched/`` area, with this machine's copy under
        ``<data_dir>/models/fetched`` (the same folder when the storage is local)."""
        return fetch_safetensors(url, self.storage, self.lora_policy, self.settings.models_dir / "fetched",
                                 refresh_after=self.settings.orphan_retention_seconds / 2)

    def _hub_error(self, what: str, exc: Exception) -> CatalogError:
        return CatalogError(
            f"could not download {what} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            "Is this machine online, and does the repo exist (gated repos need HF_TOKEN)? "
            "For offline testing run the server with --model-source tiny.")

    def _hub_snapshot(self, source: dict, patterns: list[str] | None = None) -> Path:
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(
                source["repo"], revision=source.get("revision"), cache_dir=self.settings.models_dir / "hub",
                allow_patterns=patterns or ["*.json", "*.txt", "*.model", "**/*.safetensors", "**/*.json", "**/*.txt"],
                ignore_patterns=["*.fp16.safetensors", "*non_ema*", "*.ckpt", "*.bin", "*.pt", "*.pth"]))
        except Exception as exc:  # huggingface_hub raises many types when offline
            raise self._hub_error(source["repo"], exc) from None

    def _hub_file(self, source: dict, suffixes: tuple[str, ...] = (".safetensors",)) -> Path:
        """One file of a Hub repo. ``.bin`` is allowed only for InstantID's IP-Adapter, which is read
        with ``torch.load(weights_only=True)`` (``easel.models.instantid.load_adapter_file``)."""
        from huggingface_hub import hf_hub_download

        name = source["weight_name"]
        if not name.endswith(suffixes):
            raise CatalogError(f"{source['repo']}/{name}: only {' or '.join(suffixes)} weights are loaded")
        try:
            return Path(hf_hub_download(source["repo"], name, subfolder=source.get("subfolder"),
                                        revision=source.get("revision"), cache_dir=self.settings.models_dir / "hub"))
        except Exception as exc:
            raise self._hub_error(f"{source['repo']}/{name}", exc) from None
