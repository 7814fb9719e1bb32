"""``Settings.core``: where the deployment keeps its data, its public address, its key and its logs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class CoreSettings:
    """Paths, database, public URL, secret key and logging: read by every process.

    Attributes:
        data_dir: Root of everything Easel writes: ``easel.db`` (SQLite), ``files/`` (outputs),
            ``uploads/`` (request files), ``models/`` (tiny models, fetched LoRAs, hub cache).
        database_url: SQLAlchemy URL; default ``sqlite:///<data_dir>/easel.db``.
        public_url: Base URL written into output ``url`` fields (no trailing slash).
        catalog_override: JSON file merged over the built-in model catalog at start-up;
            default ``<data_dir>/catalog.override.json``.
        secret_key: The operator key(s) that encrypt the projects' API secrets in the database:
            Fernet keys, comma-separated, the first encrypts (``easel.store.secretbox``). Empty
            (default): ``<data_dir>/secret.key``, created with mode 0600 at first start. Every
            API process of a fleet needs the same keys.
        log_format: ``text`` (default: one line per record) or ``json`` (one JSON object per
            line: ``time``, ``level``, ``logger``, ``process``, ``message``, ``exc_info``).
        log_level: Level of Easel's own log lines (``DEBUG``, ``INFO``, ``WARNING``...). The ML
            libraries' progress bars and warnings are logged at ``DEBUG`` only.
    """

    data_dir: Path = Path("easel-data")
    database_url: str = ""
    public_url: str = "http://127.0.0.1:8000"
    catalog_override: Path | None = None
    secret_key: str = field(default="", repr=False)  # never in a log line
    log_format: str = "text"
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir).resolve())
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{self.data_dir / 'easel.db'}")
        if self.catalog_override is None:
            object.__setattr__(self, "catalog_override", self.data_dir / "catalog.override.json")
        object.__setattr__(self, "public_url", self.public_url.rstrip("/"))
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be 'text' or 'json', not {self.log_format!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not {self.log_level!r}")

    @property
    def files_dir(self) -> Path:
        """Task outputs (``<data_dir>/files/<task uuid>/<name>``) with local storage."""
        return self.data_dir / "files"

    @property
    def uploads_dir(self) -> Path:
        """Request files of a Run (``<data_dir>/uploads/<task uuid>/...``) with local storage."""
        return self.data_dir / "uploads"

    @property
    def user_files_dir(self) -> Path:
        """Files uploaded with ``POST /v1/File/Upload`` (``<data_dir>/userfiles/<file id>/<name>``)."""
        return self.data_dir / "userfiles"

    @property
    def models_dir(self) -> Path:
        """Tiny models, fetched LoRAs and the hub cache (``<data_dir>/models``)."""
        return self.data_dir / "models"
