"""Server settings: one frozen object built by the CLI and handed to every layer.

Every field can also be set from the environment as ``EASEL_<FIELD>`` (upper case); list fields
take a comma-separated value. The object is picklable so worker processes receive it as is.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    """Configuration of one Easel deployment.

    Attributes:
        data_dir: Root of everything Easel writes: ``easel.db`` (SQLite), ``files/`` (outputs),
            ``uploads/`` (request files), ``models/`` (tiny models, fetched LoRAs, hub cache).
        database_url: SQLAlchemy URL; default ``sqlite:///<data_dir>/easel.db``.
        model_source: ``"tiny"`` resolves every catalog id to the offline tiny model of its
            family; ``"hub"`` downloads the real weights with huggingface_hub on first use;
            ``"random"`` resolves every id to a random-weight network of its family at the
            published size (``easel.models.fullsize``: real speed and memory, noise images).
        random_model_size: ``full`` (published sizes) or ``small`` (same architecture, narrow
            layers) for ``model_source="random"``.
        public_url: Base URL written into output ``url`` fields (no trailing slash).
        workers: Number of local worker processes.
        gpus: GPU indices (``CUDA_VISIBLE_DEVICES`` values) dealt round-robin to the local workers,
            one worker per GPU when ``workers`` equals their count; empty = every worker sees
            every GPU (and uses the first). ``"all"`` in the environment or on the command line
            means every GPU torch sees.
        fetch_allow: Hosts or CIDR ranges the URL fetcher may reach although they are loopback,
            private or link-local (tests allow their local file server this way).
        lora_max_bytes: Size cap of a LoRA downloaded from a user URL, in bytes.
        upload_max_bytes: Size cap of one uploaded request file, in bytes.
        fetch_connect_timeout / fetch_read_timeout: Seconds, per connection / per read.
        nonce_window_seconds: A timestamp nonce must be within this many seconds of now; every
            nonce is remembered (and refused again) for ``nonce_retention_seconds``.
        pipeline_cache_bytes: Memory budget of warm pipelines (weights' bytes), LRU-evicted.
        max_resident_loras: LoRA adapters kept loaded per pipeline before the LRU one is deleted.
        lora_hotswap_rank: Highest LoRA rank the FLUX tools' hot-swap slot takes (adapters are
            zero-padded to it; a higher-rank LoRA is loaded the slow way).
        torch_compile: ``torch.compile`` the FLUX transformer (CUDA or CPU; LoRA changes then
            hot-swap without recompiling).
        cpu_offload: Force ``enable_model_cpu_offload`` for FLUX (it is also chosen automatically
            when the GPU's memory is below the weights' size plus 25 %).
        preview_interval: Every how many denoising steps a latent preview JPEG is stored with the
            progress event (and at the last step); 0 disables previews.
        max_concurrent_tasks: Unfinished tasks one project may have (queued or running) before
            Run answers Wiro's code 96; 0 = unlimited.
        rate_limit_per_minute: Requests one API key may make per minute to one API process
            before HTTP 429 with ``Retry-After``; 0 = unlimited.
        webhook_max_age_seconds: How long a webhook is retried (exponential backoff from
            ``webhook_backoff_seconds``, doubling, capped at 10 minutes) before it is given up.
        webhook_timeout: Seconds per webhook attempt.
        live_poll_interval: Seconds between the store reads of an open WebSocket or a ``Prefer:
            wait`` request (each is one indexed query), i.e. the most latency they add.
        ws_path: Path of the WebSocket endpoint (Wiro's is ``wss://socket.wiro.ai/v1``).
        default_cost_per_second: Cost per second of run time for tools that set none.
        poll_interval: Seconds an idle worker waits between store polls when not woken.
        catalog_override: JSON file merged over the built-in model catalog at start-up;
            default ``<data_dir>/catalog.override.json``.
    """

    data_dir: Path = Path("easel-data")
    database_url: str = ""
    model_source: str = "tiny"
    random_model_size: str = "full"
    public_url: str = "http://127.0.0.1:8000"
    workers: int = 1
    gpus: tuple[str, ...] = field(default_factory=tuple)
    fetch_allow: tuple[str, ...] = field(default_factory=tuple)
    lora_max_bytes: int = 2 * 1024**3
    upload_max_bytes: int = 64 * 1024**2
    fetch_connect_timeout: float = 10.0
    fetch_read_timeout: float = 60.0
    nonce_window_seconds: int = 300
    nonce_retention_seconds: int = 86400
    pipeline_cache_bytes: int = 16 * 1024**3
    max_resident_loras: int = 8
    lora_hotswap_rank: int = 128
    torch_compile: bool = False
    cpu_offload: bool = False
    preview_interval: int = 5
    max_concurrent_tasks: int = 0
    rate_limit_per_minute: int = 0
    webhook_max_age_seconds: float = 24 * 3600.0
    webhook_backoff_seconds: float = 5.0
    webhook_timeout: float = 10.0
    ws_path: str = "/v1"
    live_poll_interval: float = 0.02
    default_cost_per_second: float = 0.000585
    poll_interval: float = 0.25
    catalog_override: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir).resolve())
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{self.data_dir / 'easel.db'}")
        if self.catalog_override is None:
            object.__setattr__(self, "catalog_override", self.data_dir / "catalog.override.json")
        if self.model_source not in ("tiny", "hub", "random"):
            raise ValueError(f"model_source must be 'tiny', 'hub' or 'random', not {self.model_source!r}")
        if self.random_model_size not in ("full", "small"):
            raise ValueError(f"random_model_size must be 'full' or 'small', not {self.random_model_size!r}")
        object.__setattr__(self, "public_url", self.public_url.rstrip("/"))
        if tuple(self.gpus) == ("all",):
            import torch

            object.__setattr__(self, "gpus", tuple(str(i) for i in range(torch.cuda.device_count())))

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        """Build settings from ``EASEL_*`` environment variables, then explicit overrides."""
        values: dict = {}
        for f in fields(cls):
            raw = os.environ.get(f"EASEL_{f.name.upper()}")
            if raw is None:
                continue
            if f.name in ("fetch_allow", "gpus"):
                values[f.name] = tuple(x.strip() for x in raw.split(",") if x.strip())
            elif f.type in ("int",):
                values[f.name] = int(raw)
            elif f.type in ("float",):
                values[f.name] = float(raw)
            elif f.type in ("bool",):
                values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            else:
                values[f.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)
