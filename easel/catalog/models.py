"""The global model catalog: ids shared by all tools (``models.json`` plus the operator's override).

An operator override file (``Settings.catalog_override``) is merged over ``models.json`` at
start-up, so a community model whose source is unknown can be pointed at its weights without
editing the package.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CatalogError

HERE = Path(__file__).parent

CHECKPOINT_KINDS = ("sd15", "sdxl", "flux")
LORA_KINDS = ("sd15-lora", "sdxl-lora", "flux-lora")
# components: weights transformations (IC-Light offsets) and auxiliary networks (matting, ControlNets,
# InstantID's IP-Adapter, the face-analysis pack, condition estimators)
COMPONENT_KINDS = ("sd15-iclight", "matting", "sdxl-controlnet", "sdxl-ip-adapter", "face-analysis", "annotator")
KINDS = CHECKPOINT_KINDS + LORA_KINDS + COMPONENT_KINDS


@dataclass(frozen=True)
class ModelEntry:
    """One id of the global model catalog.

    ``source`` is ``None`` (unknown), ``{"type": "hf", "repo": ..., "weight_name"?: ...,
    "subfolder"?: ...}`` or ``{"type": "url", "url": "https://.../x.safetensors"}``.
    ``lora_format`` (LoRAs only) names the key layout the file uses, when known. ``tiny`` names
    the offline tiny model (``easel.synthetic.tiny``) that stands in for a component in tiny mode;
    ``condition`` (ControlNets) the condition image it reads: ``canny``, ``depth`` or ``openpose``.
    ``license``: ``{"id", "url"?, "noncommercial"?, "gated"?, "accept"?}``; with ``accept`` the
    weights are fetched only once the operator accepted that name (``Settings.accept_licenses``).
    Hub sources may also carry ``revision``, ``repo_type`` (``dataset``), ``files`` (exact repo
    paths), ``allow_patterns``, ``sha256`` and ``size`` (bytes); see docs/models.md.
    """

    id: str
    kind: str
    label: str
    description: str = ""
    triggerwords: tuple[str, ...] = ()
    generatesettings: tuple[dict, ...] = ()
    source: dict | None = None
    why: str = ""
    lora_format: str = ""
    tiny: str = ""
    condition: str = ""
    license: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        """``sd15``, ``sdxl`` or ``flux``."""
        return self.kind.split("-")[0]


class ModelCatalog:
    """Id → :class:`ModelEntry`, built from ``models.json`` plus an optional override file.

    The override file has the same shape: ``{"models": {"881": {"source": {...}}}}``; each listed
    id's fields replace the built-in ones (new ids may be added with all fields).
    """

    def __init__(self, entries: dict[str, ModelEntry], override_path: Path | None = None):
        self.entries = entries
        self.override_path = override_path

    @classmethod
    def load(cls, override_path: Path | None = None) -> "ModelCatalog":
        """Read the built-in catalog and merge ``override_path`` if it exists.

        Raises:
            CatalogError: the override file is not valid JSON or names an unknown kind.
        """
        data = json.loads((HERE / "models.json").read_text())["models"]
        if override_path is not None and Path(override_path).exists():
            try:
                extra = json.loads(Path(override_path).read_text()).get("models", {})
            except (ValueError, AttributeError) as exc:
                raise CatalogError(f"catalog override {override_path} is not valid JSON: {exc}") from exc
            for mid, fields_ in extra.items():
                data[str(mid)] = {**data.get(str(mid), {}), **fields_}
        entries = {}
        for mid, e in data.items():
            kind = e.get("kind")
            if kind not in KINDS:
                raise CatalogError(f"catalog id {mid}: kind {kind!r} is not one of {', '.join(KINDS)}")
            entries[mid] = ModelEntry(
                id=mid, kind=kind, label=e.get("label", mid), description=e.get("description", ""),
                triggerwords=tuple(e.get("triggerwords", ())),
                generatesettings=tuple(e.get("generatesettings", ())),
                source=e.get("source"), why=e.get("why", ""), lora_format=e.get("lora_format", ""),
                tiny=e.get("tiny", ""), condition=e.get("condition", ""), license=e.get("license") or {},
            )
        return cls(entries, override_path)

    def get(self, model_id: str) -> ModelEntry:
        """Return the entry; raises ``KeyError`` for an id the catalog does not have."""
        return self.entries[str(model_id)]

    def require_source(self, entry: ModelEntry) -> dict:
        """Return the entry's source, or raise :class:`CatalogError` telling the operator how to set it."""
        if entry.source:
            return entry.source
        where = self.override_path or "<data-dir>/catalog.override.json"
        raise CatalogError(
            f"Model {entry.id} ({entry.label}) has no weights source configured: its true source is not "
            f"public knowledge. The server operator can set it in {where}, e.g. "
            f'{{"models": {{"{entry.id}": {{"source": {{"type": "url", "url": "https://.../model.safetensors"}}}}}}}} '
            f'or {{"source": {{"type": "hf", "repo": "owner/name"}}}}, then restart the server; or run '
            f"`easel models set {entry.id} --hf OWNER/REPO[:FILE] | --url URL`."
        )
