"""Resolving a catalog entry (or a user URL) to weights on local disk.

Two sources, chosen by ``Settings.weights.model_source``:

- ``tiny``: every id resolves to the offline tiny model of its family, in the same on-disk format
  as the real entry (a Hub repo → tiny diffusers folder; a single-file URL → tiny single-file
  checkpoint; LoRAs → a tiny Kohya- or PEFT-layout file). The tiny models are written on first use.
- ``random``: every id resolves to a random-weight network of its family at the published size
  (or ``Settings.weights.random_model_size="small"``), written once as a diffusers folder under
  ``<data_dir>/models/random`` on the device the worker runs on (``easel.synthetic.fullsize``);
  LoRAs resolve to random LoRAs of rank 16 over those networks. For speed and memory work.
- ``hub``: Hub repos download on first use (or ``easel models pull``) into ``<data_dir>/models/hub``,
  exactly the files the pipeline loads (``easel.weights.download``); ``url`` sources go through the
  safe fetcher. Weights whose licence must be accepted are fetched only once it was
  (:meth:`ModelSources.require_license`). Offline, the error says so.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from easel.catalog import CHECKPOINT_KINDS, LORA_KINDS, CatalogError, ModelCatalog, ModelEntry
from easel.config import Settings
from easel.storage import Storage, create_storage

from easel.net.fetch import FetchPolicy, fetch_safetensors
from easel.synthetic.tiny import make_tiny
from easel.weights.licenses import accepted_licenses, license_problem, record_license

if TYPE_CHECKING:  # pragma: no cover
    from easel.tools.base import Family

FACE_PACK = "antelopev2"


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
        """Keeps only the parts of ``settings`` it reads: ``weights`` (the source, licences, caps),
        ``fetch`` (the fetcher's allow-list and timeouts), the models folder and the fetched files'
        refresh age (half ``storage.orphan_retention_seconds``). ``storage`` keeps fetched weights
        (default: the one ``settings.storage.storage`` names)."""
        self.weights = settings.weights
        self.fetch = settings.fetch
        self.models_dir = settings.core.models_dir
        self.refresh_after = settings.storage.orphan_retention_seconds / 2
        self.catalog = catalog
        self.storage: Storage = storage if storage is not None else create_storage(settings)
        self._tiny_lock = threading.Lock()
        self._tiny: dict[str, Path] | None = None
        self._random: dict[str, Path] = {}
        # told the bytes of each download (done, total) while a task resolves its weights; it may
        # raise to stop the download (the worker sets it for the task's preprocess phase)
        self.progress: "Callable[[int, int], None] | None" = None
        # told each file a Hub download starts, and its bytes (easel models pull's bars)
        self.on_file: "Callable | None" = None
        self.on_bytes: "Callable | None" = None

    @property
    def lora_policy(self) -> FetchPolicy:
        f = self.fetch
        return FetchPolicy(allow=f.fetch_allow, max_bytes=self.weights.lora_max_bytes, connect_timeout=f.fetch_connect_timeout,
                           read_timeout=f.fetch_read_timeout, total_timeout=f.fetch_total_timeout_seconds)

    def tiny(self) -> dict[str, Path]:
        """Paths of the tiny models, writing them under ``<data_dir>/models/tiny`` if needed."""
        with self._tiny_lock:
            if self._tiny is None:
                self._tiny = make_tiny(self.models_dir / "tiny")
            return self._tiny

    def random(self, family: str) -> Path:
        """The random-weight pipeline folder of ``family`` (written on first use, on the GPU when
        there is one, in the dtype the worker loads it with)."""
        from easel.synthetic.fullsize import make_random

        declared = _family(family)
        if declared is None or not declared.random:
            raise CatalogError(f"no random full-size model exists for the {family} family")
        with self._tiny_lock:
            if family not in self._random:
                from easel.weights.precision import precision

                where = precision(family, self.weights.cpu_precision)
                self._random[family] = make_random(self.models_dir / "random", family,
                                                   self.weights.random_model_size, device=where.device,
                                                   dtype=where.dtype)
            return self._random[family]

    def checkpoint(self, entry: ModelEntry) -> Weights:
        """Weights of a checkpoint entry (kind sd15/sdxl/flux).

        Raises:
            CatalogError: unknown source (hub mode), a family without a tiny model, or a failed download.
        """
        if self.weights.model_source == "random":
            folder = self.random(entry.family)
            return Weights("diffusers", folder, key=f"random:{folder.name}")
        if self.weights.model_source == "tiny":
            tiny = self.tiny()
            declared = _family(entry.family)
            if declared is None or declared.tiny is None:
                raise CatalogError(f"no tiny model exists yet for the {entry.family} family (catalog id {entry.id})")
            stand_in = declared.tiny
            source = entry.source or {}
            one_file = source.get("type") == "url" or source.get("weight_name") or len(source.get("files") or []) == 1
            if stand_in.single_file and one_file:
                return Weights("single_file", tiny[stand_in.single_file], config=tiny[stand_in.checkpoint],
                               key=f"tiny-{declared.name}-single")
            return Weights("diffusers", tiny[stand_in.checkpoint], key=f"tiny-{stand_in.checkpoint}")
        source = self.catalog.require_source(entry)
        if source["type"] == "hf":
            if source.get("weight_name") or len(source.get("files") or []) == 1:
                path = self._hub_file(entry, source, "")
                return Weights("single_file", path, key=f"hf:{source['repo']}/{path.name}")
            return Weights("diffusers", self._hub(entry, source), key=f"hf:{source['repo']}@{source.get('revision', '')}")
        if source["type"] == "url":
            path = self._catalog_url(entry, source)
            return Weights("single_file", path, key=f"file:{path.name}")
        raise CatalogError(f"catalog id {entry.id}: unknown source type {source.get('type')!r} (use 'hf' or 'url')")

    def lora(self, entry: ModelEntry) -> Weights:
        """Weights of a LoRA entry.

        Raises:
            CatalogError: as for :meth:`checkpoint`.
        """
        if self.weights.model_source == "random":
            from easel.synthetic.fullsize import lora_paths

            folder = self.random(entry.family)
            paths = lora_paths(folder, entry.family)
            path = paths.get(entry.lora_format or "", paths["peft"])
            return Weights("lora", path, key=f"random:{folder.name}/{path.name}")
        if self.weights.model_source == "tiny":
            tiny = self.tiny()
            declared = _family(entry.family)
            if declared is None or declared.tiny is None or not declared.tiny.lora_prefix:
                raise CatalogError(f"no tiny model exists yet for the {entry.family} family (catalog id {entry.id})")
            # The entry's known layout, else: community LoRAs (unknown or URL sources) ship in
            # Kohya layout, Hub ones in PEFT layout.
            layout = entry.lora_format or ("peft" if (entry.source or {}).get("type") == "hf" else "kohya")
            name = f"{declared.tiny.lora_prefix}-{layout}"
            if name not in tiny:
                raise CatalogError(f"no tiny {entry.family} LoRA in the {layout} layout (catalog id {entry.id})")
            return Weights("lora", tiny[name], key=f"tiny-{name}")
        source = self.catalog.require_source(entry)
        if source["type"] == "hf" and source.get("allow_patterns") and not (source.get("files") or source.get("weight_name")):
            path = self._one_file(entry, source)  # a repo whose file name is not known: its one .safetensors
        elif source["type"] == "hf":
            path = self._hub_file(entry, source, "pytorch_lora_weights.safetensors")
        elif source["type"] == "url":
            path = self._catalog_url(entry, source)
        else:
            raise CatalogError(f"catalog id {entry.id}: unknown source type {source.get('type')!r}")
        return Weights("lora", path, key=f"file:{path.name}")

    def component(self, entry: ModelEntry) -> Weights:
        """Weights of a component entry: an IC-Light offset (``sd15-iclight``) or RMBG-1.4
        (``matting``), one ``.safetensors`` file each; an SDXL ControlNet or condition estimator
        (``diffusers``: a folder ``from_pretrained`` reads); or InstantID's IP-Adapter (one file).

        Hub sources: a repo folder (``subfolder`` selects e.g. IdentityNet's ``ControlNetModel/``),
        or one file with ``weight_name`` or one ``files`` entry (IP-Adapter ``ip-adapter.bin``, read with
        ``torch.load(weights_only=True)``; IC-Light and RMBG default to ``model.safetensors``).
        Tiny mode: the tiny model named by the entry's ``tiny`` (or its kind's).

        Raises:
            CatalogError: no tiny stand-in, unknown source, or a failed download.
        """
        single_file = entry.kind in ("sd15-iclight", "matting", "sdxl-ip-adapter")
        if self.weights.model_source == "tiny":
            tiny = self.tiny()
            name = entry.tiny or {"sd15-iclight": "iclight-fbc", "matting": "rmbg"}.get(entry.kind)
            if name not in tiny:
                raise CatalogError(f"no tiny model stands in for catalog id {entry.id} ({entry.label})")
            path = tiny[name]
            return Weights("diffusers" if path.is_dir() else "file", path, key=f"tiny-{name}")
        source = self.catalog.require_source(entry)
        if source["type"] == "url" and single_file:
            path = self._catalog_url(entry, source)
            return Weights("file", path, key=f"file:{path.name}")
        if source["type"] != "hf":
            raise CatalogError(f"catalog id {entry.id}: unknown source type {source.get('type')!r} for a component")
        if source.get("weight_name") or single_file:
            # the IP-Adapter's released file is a pickle (ip-adapter.bin), read with weights_only=True
            path = self._hub_file(entry, source, "model.safetensors",
                                  suffixes=(".safetensors",) if entry.kind in ("sd15-iclight", "matting")
                                  else (".safetensors", ".bin"))
            return Weights("file", path, key=f"hf:{source['repo']}/{path.name}")
        folder = self._hub(entry, source)
        if source.get("subfolder"):
            folder = folder / source["subfolder"]
        return Weights("diffusers", folder, key=f"hf:{source['repo']}/{source.get('subfolder', '')}")

    def face_root(self) -> Path:
        """The insightface ``root`` whose ``models/antelopev2/`` holds the face-analysis pack.

        Tiny mode: the tiny ONNX pack. Otherwise ``<data_dir>/models/insightface``: a pack placed
        there by hand is used as it is; in hub mode a missing one is fetched from the catalog's
        ``antelopev2`` source into it, after its licence (non-commercial) was accepted.
        :class:`easel.pipelines.faces.FaceAnalyzer` checks it.

        Raises:
            CatalogError: (hub mode, pack missing) licence not accepted, or the download failed.
        """
        if self.weights.model_source == "tiny":
            return self.tiny()["faces"]
        from easel.pipelines.faces import REQUIRED, pack_folder

        root = self.models_dir / "insightface"
        entry = self.catalog.entries.get(FACE_PACK)
        if self.weights.model_source == "hub" and entry is not None and entry.source \
                and not all((pack_folder(root) / n).is_file() for n in REQUIRED):
            self._hub(entry, {**entry.source, "files": list(entry.source.get("files") or REQUIRED)}, pack_folder(root))
        return root

    def lora_from_url(self, url: str) -> Weights:
        """Fetch a user's LoRA URL with the safe fetcher (in every model-source mode).

        Raises:
            easel.net.fetch.FetchError: refused URL or content.
        """
        path = self._fetch(url)
        return Weights("lora", path, key=f"file:{path.name}")

    # -- helpers ------------------------------------------------------------------------------

    def _fetch(self, url: str) -> Path:
        """A URL's weights through the storage's ``fetched/`` area, with this machine's copy under
        ``<data_dir>/models/fetched`` (the same folder when the storage is local)."""
        return fetch_safetensors(url, self.storage, self.lora_policy, self.models_dir / "fetched",
                                 refresh_after=self.refresh_after)

    def _hub(self, entry: ModelEntry | None, source: dict, target: Path | None = None) -> Path:
        """The local folder of an ``hf`` source's selection (``easel.weights.download``): from disk
        when it was fetched completely before, else fetched now (licence checked first), with
        :attr:`progress` told the bytes. ``target`` puts the files in that folder instead."""
        from easel.weights.download import complete_folder, hub_plan, run_plan

        root = self.models_dir / "hub"
        if entry is not None:
            self.require_license(entry)
        if target is None:
            folder = complete_folder(root, source)
            if folder is not None:
                return folder
        plan = hub_plan(root, source)
        if target is not None:
            plan.folder, plan.marker = target, None
        return run_plan(plan, root, self.progress, self.weights.download_reserve_bytes, on_file=self.on_file,
                        on_bytes=self.on_bytes)

    def _hub_file(self, entry: ModelEntry | None, source: dict, default: str,
                  suffixes: tuple[str, ...] = (".safetensors",)) -> Path:
        """One file of a Hub repo: ``files[0]``, ``subfolder/weight_name`` or ``default``. ``.bin`` is
        allowed only for InstantID's IP-Adapter, which is read with ``torch.load(weights_only=True)``
        (``easel.pipelines.instantid.load_adapter_file``)."""
        files = source.get("files") or []
        sub = (source.get("subfolder") or "").strip("/")
        name = files[0] if len(files) == 1 else source.get("weight_name") or default
        path = name if files or not sub else f"{sub}/{name}"
        if not path.endswith(suffixes):
            raise CatalogError(f"{source['repo']}/{path}: only {' or '.join(suffixes)} weights are loaded")
        return self._hub(entry, {**source, "files": [path]}) / path

    def _one_file(self, entry: ModelEntry, source: dict) -> Path:
        """The one ``.safetensors`` an ``allow_patterns`` selection fetched (a LoRA repo whose file
        name was not known when the catalog was written).

        Raises:
            CatalogError: the selection holds several files (the message lists them and how to pin one).
        """
        folder = self._hub(entry, source)
        found = sorted(p for p in folder.rglob("*.safetensors") if ".easel" not in p.parts)
        if len(found) != 1:
            names = ", ".join(str(p.relative_to(folder)) for p in found)
            raise CatalogError(f"{entry.id} ({entry.label}): {source['repo']} holds {len(found)} .safetensors files "
                               f"({names}); pin one with `easel models set {entry.id} --hf {source['repo']}:FILE`")
        return found[0]

    def _catalog_url(self, entry: ModelEntry, source: dict) -> Path:
        """A catalog ``url`` source (e.g. Civitai's download API) through the safe fetcher, with the
        weights' size cap, progress, ``CIVITAI_TOKEN`` for civitai.com and a pinned ``sha256``."""
        import os
        from urllib.parse import urlsplit

        from easel.weights.download import DownloadError
        from easel.net.fetch import FetchError

        self.require_license(entry)
        f, w = self.fetch, self.weights
        policy = FetchPolicy(allow=f.fetch_allow, max_bytes=w.weights_max_bytes, connect_timeout=f.fetch_connect_timeout,
                             read_timeout=f.fetch_read_timeout, total_timeout=w.weights_fetch_timeout_seconds)
        headers = {}
        host = (urlsplit(source["url"]).hostname or "").lower()
        if os.environ.get("CIVITAI_TOKEN") and (host == "civitai.com" or host.endswith(".civitai.com")):
            headers["Authorization"] = f"Bearer {os.environ['CIVITAI_TOKEN']}"
        where = f"{entry.id} ({entry.label}) from {source['url']}"
        try:
            path = fetch_safetensors(source["url"], self.storage, policy, self.models_dir / "fetched",
                                     refresh_after=self.refresh_after, headers=headers,
                                     progress=self.progress)
        except FetchError as exc:
            raise DownloadError(f"could not download {where}: {exc}") from None
        pin = source.get("sha256")
        if pin and path.stem != pin.lower():
            raise DownloadError(f"could not download {where}: sha256 mismatch (expected {pin}, got {path.stem})")
        return path

    def resolve(self, entry: ModelEntry) -> Path:
        """The local weights of any entry (``easel models pull``): a checkpoint, LoRA, component,
        or the face-analysis pack (its insightface root).

        Raises:
            CatalogError: as :meth:`checkpoint`.
        """
        if entry.kind in CHECKPOINT_KINDS:
            return self.checkpoint(entry).path
        if entry.kind in LORA_KINDS:
            return self.lora(entry).path
        if entry.kind == "face-analysis":
            return self.face_root()
        return self.component(entry).path

    def is_local(self, entry: ModelEntry) -> bool:
        """Whether ``entry``'s weights are on this machine (hub mode's folders, fetched URLs, a
        placed face pack), without asking any server."""
        import hashlib
        import json

        from easel.pipelines.faces import REQUIRED, pack_folder

        if entry.kind == "face-analysis":
            return all((pack_folder(self.models_dir / "insightface") / n).is_file() for n in REQUIRED)
        source = entry.source or {}
        if source.get("type") == "url":
            try:
                self.storage.get_bytes(f"fetched/urls/{hashlib.sha256(source['url'].encode()).hexdigest()}")
                return True
            except (FileNotFoundError, OSError):
                return False
        if source.get("type") != "hf":
            return False
        from easel.weights.download import repo_folder

        folder = repo_folder(self.models_dir / "hub", source)
        for marker in (folder / ".easel").glob("*.json"):
            try:
                if all((folder / f).is_file() for f in json.loads(marker.read_text())["files"]):
                    return True
            except (OSError, ValueError, KeyError):
                continue
        return False

    # -- licences (easel.weights.licenses) ---------------------------------------------------

    def accepted_licenses(self) -> set[str]:
        """Licence names the operator accepted (:func:`easel.weights.licenses.accepted_licenses`)."""
        return accepted_licenses(self.weights, self.models_dir)

    def record_license(self, names: list[str]) -> None:
        """Record licence names as accepted (``easel models pull --accept-license``)."""
        record_license(self.weights, self.models_dir, names)

    def require_license(self, entry: ModelEntry) -> None:
        """Raise :class:`easel.weights.download.LicenseNotAccepted` when ``entry``'s licence must be
        accepted (``license.accept`` names it) and was not (:func:`easel.weights.licenses.license_problem`)."""
        from easel.weights.download import LicenseNotAccepted

        problem = license_problem(entry, self.weights, self.models_dir)
        if problem:
            raise LicenseNotAccepted(problem)


def _family(name: str) -> "Family | None":
    """The declared model family ``name`` (its tiny stand-ins, whether random weights exist), from
    the registered tools' declarations; None when no registered tool declares it."""
    from easel.tools.registry import families

    return families().get(name)
