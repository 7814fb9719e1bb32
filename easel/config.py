"""Server settings: one frozen object built by the CLI and handed to every layer.

Every field can be set in a TOML config file (``--config`` / ``EASEL_CONFIG_FILE``), in the
environment as ``EASEL_<FIELD>`` (upper case; list fields take a comma-separated value) and, for
the common ones, by ``easel serve`` flags; a flag overrides only when it is given. Sources are
read and validated with ``pydantic-settings``. The object is picklable so worker processes
receive it as is.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path


CPU_PRECISIONS = ("float32", "half")  # Settings.cpu_precision's values (easel.weights.precision)


def check_cpu_precision(value: str) -> str:
    """``value`` if it is one of :data:`CPU_PRECISIONS`.

    Raises:
        ValueError: any other value (the message lists the accepted ones).
    """
    if value not in CPU_PRECISIONS:
        raise ValueError(f"cpu_precision must be one of {', '.join(CPU_PRECISIONS)}, not {value!r}")
    return value


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
            published size (``easel.synthetic.fullsize``: real speed and memory, noise images).
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
        accept_licenses: Licence names (the catalog entries' ``license.accept``: ``flux.1-dev``,
            ``antelopev2``, ``bria-rmbg-1.4`` ...; ``all`` for every one) the operator accepts;
            weights under another such licence are not fetched and a Run needing them fails
            saying how to accept (``EASEL_ACCEPT_LICENSES=flux.1-dev,antelopev2``).
        download_reserve_bytes: Bytes a weights download must leave free on its disk (checked
            before it starts).
        weights_max_bytes: Size cap of one weights file from a catalog ``url`` source.
        weights_fetch_timeout_seconds: Time limit of one catalog ``url`` download.
        upload_max_bytes: Size cap of one uploaded request file (Run multipart or
            ``/v1/File/Upload``) and of an input image fetched from a URL, in bytes.
        max_image_pixels: Largest image input (width × height) a tool decodes; larger ones,
            and decompression bombs, are refused from the header before any pixel is decoded.
        fetch_connect_timeout / fetch_read_timeout: Seconds, per connection / per read.
        nonce_window_seconds: For projects with the ``strict`` nonce policy: a timestamp nonce
            must be within this many seconds of now; every nonce is remembered (and refused
            again) for ``nonce_retention_seconds``. The default ``lenient`` policy uses neither.
        cors_origins: Browser origins allowed to call the API cross-origin (CORS, with preflight
            answers); empty (the default) sends no CORS headers; ``*`` allows any origin.
        pipeline_cache_bytes: Memory budget of warm pipelines (weights' bytes), LRU-evicted.
        device_memory_headroom_bytes: On CUDA, device memory a worker keeps free for a task's
            activations: before a model loads, warm ones are evicted until the device's actually
            free memory (the driver's count, so another worker on the GPU counts) holds the new
            weights plus this much.
        max_resident_loras: LoRA adapters kept loaded per pipeline before the LRU one is deleted.
        lora_hotswap_rank: Highest LoRA rank the FLUX tools' hot-swap slot takes (adapters are
            zero-padded to it; a higher-rank LoRA is loaded the slow way).
        torch_compile: ``torch.compile`` the FLUX transformer (CUDA or CPU; LoRA changes then
            hot-swap without recompiling).
        cpu_offload: Force ``enable_model_cpu_offload`` for FLUX (it is also chosen automatically
            when the GPU's memory is below the weights' size plus 25 %).
        cpu_precision: Dtypes of the networks on a machine without CUDA: ``float32`` (default) or
            ``half``, the dtypes CUDA uses (bf16 for FLUX, fp16 for SD 1.5 / SDXL, IC-Light's
            bf16 VAE...), so the GPU path's dtype combinations run on the CPU (slowly); for tests
            and debugging. No effect with CUDA. See ``easel.weights.precision``.
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
        lease_seconds: How long a worker's claim on a task lasts without renewal. The worker
            renews it at every step and from a heartbeat thread (every third of it); a running
            task whose lease expired is ended by whichever Easel process notices first.
        requeue_unstarted: A task whose lease expired before ``task_start`` (no inference ran)
            is queued again instead of failed.
        task_timeout_seconds: Longest a task may run from ``task_accept``; it then ends as
            failed with the reason. 0 = no limit.
        fetch_total_timeout_seconds: Deadline of one whole download (DNS, connect, redirects
            and the transfer), whatever the per-read timeouts allow.
        request_max_bytes: Largest request body (files included) the API reads; larger bodies
            are refused with HTTP 413 while streaming, before they are buffered.
        openai_wait_seconds: Longest an OpenAI Images API request (``/v1/images/...``) holds for its
            task's end (``Prefer: wait=N`` lowers it per request); past it, HTTP 504 with the Wiro
            task id, and the task keeps running.
        openai_kill_on_disconnect: Stop (cancel or kill) an OpenAI Images API request's task when its
            client disconnects before the end; off by default (the task runs on, as a Wiro Run's).
        body_max_bytes: Largest JSON or URL-encoded body (no files: a JSON object sent under a
            multipart content type too) and largest text part of a multipart body; refused
            with HTTP 413 while streaming. Much lower than ``request_max_bytes``, which
            bounds bodies that carry files.
        webhook_concurrency: Webhook attempts sent at the same time by one API process.
        output_retention_seconds: Delete a finished task's outputs and uploads this long after
            it ended (the record stays, as after InputOutputDelete); 0 = keep for ever.
        event_retention_seconds: Delete the per-step events (``task_output`` progress with its
            preview JPEG, ``task_error`` lines) of tasks that ended this long ago; the lifecycle
            events stay, so a late WebSocket client still gets the whole stage sequence and the
            end. 0 = keep for ever.
        orphan_retention_seconds: Delete upload folders and worker scratch folders that belong
            to no task (a refused or crashed request), and fetched LoRAs not used for this long;
            0 = never.
        sweep_interval_seconds: Seconds between retention sweeps (and lease checks are every
            quarter ``lease_seconds``) in each API process.
        metrics_token: When set, ``/metrics`` answers only requests with ``Authorization: Bearer
            <metrics_token>`` (HTTP 401 otherwise); empty (default) = open, like ``/healthz``.
        executor: ``local`` (worker processes of ``easel serve``) or ``celery`` (the API sends task
            ids to a broker; ``easel worker`` processes run them: ``docs/deploy.md``).
        broker_url: The Celery broker of a fleet: ``redis://host:port/db`` (default
            ``redis://127.0.0.1:6379/0``) or ``amqp://user:password@host:port/vhost`` (RabbitMQ).
        queues: Model families an ``easel worker`` serves (its Celery queues), among those the
            registered tools declare (``easel.catalog.families()``); empty = all of them.
        queue_prefix: Prefix of the fleet's queue names (``<prefix>.<family>``) and, on Redis, of
            every key the broker writes, so several fleets (or test runs) can share one broker.
        broker_visibility_timeout: Seconds a delivered, unacknowledged message stays invisible
            (Redis ``visibility_timeout``) and may stay unacknowledged (RabbitMQ per-queue
            ``x-consumer-timeout``) before the broker gives it to another worker; 0 = derived:
            ``task_timeout_seconds`` + ``lease_seconds`` + 300 (one day when there is no task
            timeout), i.e. longer than the longest task.
        broker_redeliver_seconds: An API process publishes a task id again when the task is still
            queued this long after its last publication (a message lost with a broker restart);
            a task queued again by the lease rules, or whose first publication failed, is
            published at the next maintenance pass. 0 = only those.
        storage: Where outputs, uploads and fetched LoRAs are kept: ``local`` (under
            ``data_dir``) or ``s3://bucket/prefix`` (S3-compatible object storage through boto3;
            credentials from boto3's default chain: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
            ``AWS_PROFILE``, ``~/.aws``, instance roles). See ``docs/storage.md``.
        s3_endpoint_url: S3 endpoint (MinIO, Ceph RADOS Gateway, R2...); empty = boto3's choice
            (``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, else AWS for the region).
        s3_region: S3 region; empty = boto3's (``AWS_REGION``/``AWS_DEFAULT_REGION``, ``~/.aws/config``).
        s3_addressing_style: ``auto``, ``path`` (``endpoint/bucket/key``, what most self-hosted
            servers need behind a plain host name) or ``virtual`` (``bucket.endpoint/key``).
        output_urls: ``served`` (default): output URLs point at this API
            (``/v1/File/{accesskey}/{name}``, the task's access key is the credential; with S3 the
            API streams the object); ``presigned``: S3 presigned GET URLs (needs ``s3://`` storage).
        s3_presign_seconds: Lifetime of a presigned URL, 1 to 604800 (7 days, SigV4's limit); a
            new one is made at every Task/Detail, socket message and webhook.
        redis_url: Redis shared by the fleet's processes (``redis://[:password@]host:port/db``,
            ``rediss://`` for TLS): pushed live-event wake-ups (pub/sub) and the rate limit's
            shared window; empty (default) = none.
        redis_prefix: Prefix of Easel's Redis keys and channels (``<prefix>:events``,
            ``<prefix>:ratelimit/...``), so several deployments can share one Redis.
        live_push: How WebSocket and ``Prefer: wait`` waiters learn of new events: ``auto``
            (Redis pub/sub with ``redis_url``, else PostgreSQL ``LISTEN/NOTIFY`` on a PostgreSQL
            store, else polling), ``redis``, ``postgres`` or ``off`` (polling).
        live_fallback_poll_interval: Seconds between the store reads of a waiter while wake-ups
            are pushed and none comes (a lost wake-up delays an event at most this long).
        api_processes: API processes ``easel serve`` runs on the one port (the kernel spreads
            connections over them; they share the store, and the local workers belong to the
            serving parent process, whichever API process took the Run).
        api_threads: Threads of each API process that run store calls (requests' synchronous
            parts); the process's database connection pool holds as many connections.
        torch_threads: CPU threads (``torch.set_num_threads``) of each local worker process.
            0 (default) = automatic: without CUDA, the cores left after one for the API, shared
            among the workers (at least 1 each), so that the API answers while torch computes;
            with CUDA, torch's default. The ``easel worker`` of a separate machine keeps torch's
            default unless this is set.
        secret_key: The operator key(s) that encrypt the projects' API secrets in the database:
            Fernet keys, comma-separated, the first encrypts (``easel.store.secretbox``). Empty
            (default): ``<data_dir>/secret.key``, created with mode 0600 at first start. Every
            API process of a fleet needs the same keys.
        shutdown_grace_seconds: On SIGTERM/SIGINT, how long a running task may take to finish
            before it is ended as failed ("the server stopped ...") and its worker exits; idle
            workers stop at once. A worker that still has not exited a few seconds later is
            killed (SIGKILL) and its task failed by the server.
        preload: Tools (``OWNER/SLUG``) whose pipelines each local worker loads at start, before
            it takes its first task, so the first Run of these tools starts denoising at once;
            ``/readyz`` says which are warm.
        log_format: ``text`` (default: one line per record) or ``json`` (one JSON object per
            line: ``time``, ``level``, ``logger``, ``process``, ``message``, ``exc_info``).
        log_level: Level of Easel's own log lines (``DEBUG``, ``INFO``, ``WARNING``...). The ML
            libraries' progress bars and warnings are logged at ``DEBUG`` only.
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
    accept_licenses: tuple[str, ...] = field(default_factory=tuple)
    download_reserve_bytes: int = 512 * 1024**2
    weights_max_bytes: int = 64 * 1024**3
    weights_fetch_timeout_seconds: float = 6 * 3600.0
    upload_max_bytes: int = 64 * 1024**2
    max_image_pixels: int = 4096 * 4096
    fetch_connect_timeout: float = 10.0
    fetch_read_timeout: float = 60.0
    nonce_window_seconds: int = 300
    nonce_retention_seconds: int = 86400
    cors_origins: tuple[str, ...] = field(default_factory=tuple)
    pipeline_cache_bytes: int = 16 * 1024**3
    device_memory_headroom_bytes: int = 3 * 1024**3
    max_resident_loras: int = 8
    lora_hotswap_rank: int = 128
    torch_compile: bool = False
    cpu_offload: bool = False
    cpu_precision: str = "float32"
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
    lease_seconds: float = 30.0
    requeue_unstarted: bool = False
    task_timeout_seconds: float = 3600.0
    fetch_total_timeout_seconds: float = 600.0
    request_max_bytes: int = 256 * 1024**2
    body_max_bytes: int = 1024**2
    webhook_concurrency: int = 8
    output_retention_seconds: float = 0.0
    orphan_retention_seconds: float = 7 * 24 * 3600.0
    event_retention_seconds: float = 7 * 24 * 3600.0
    sweep_interval_seconds: float = 600.0
    metrics_token: str = ""
    executor: str = "local"
    broker_url: str = "redis://127.0.0.1:6379/0"
    queues: tuple[str, ...] = field(default_factory=tuple)
    queue_prefix: str = "easel"
    broker_visibility_timeout: float = 0.0
    broker_redeliver_seconds: float = 900.0
    storage: str = "local"
    s3_endpoint_url: str = ""
    s3_region: str = ""
    s3_addressing_style: str = "auto"
    output_urls: str = "served"
    s3_presign_seconds: int = 3600
    redis_url: str = ""
    redis_prefix: str = "easel"
    live_push: str = "auto"
    live_fallback_poll_interval: float = 1.0
    api_processes: int = 1
    api_threads: int = 16
    torch_threads: int = 0
    openai_wait_seconds: float = 600.0
    openai_kill_on_disconnect: bool = False
    secret_key: str = field(default="", repr=False)  # never in a log line
    shutdown_grace_seconds: float = 5.0
    preload: tuple[str, ...] = field(default_factory=tuple)
    log_format: str = "text"
    log_level: str = "INFO"

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
        if self.executor not in ("local", "celery"):
            raise ValueError(f"executor must be 'local' or 'celery', not {self.executor!r}")
        if self.broker_url.split("://", 1)[0] not in ("redis", "rediss", "amqp", "amqps", "pyamqp"):
            raise ValueError(f"broker_url must be a redis://, rediss://, amqp:// or amqps:// URL, not {self.broker_url!r}")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", self.queue_prefix):
            raise ValueError(f"queue_prefix must be 1 to 40 letters, digits, '_' or '-', not {self.queue_prefix!r}")
        if self.queues:  # the families the registered tools declare (importing them only when asked)
            from easel.catalog import families

            unknown = [q for q in self.queues if q not in families()]
            if unknown:
                raise ValueError(f"queues must be among {', '.join(families())}, not {', '.join(map(repr, unknown))}")
        if self.storage in ("", "local"):
            object.__setattr__(self, "storage", "local")
        else:
            parse_s3_url(self.storage)
        if self.output_urls not in ("served", "presigned"):
            raise ValueError(f"output_urls must be 'served' or 'presigned', not {self.output_urls!r}")
        if self.output_urls == "presigned" and self.storage == "local":
            raise ValueError("output_urls 'presigned' needs S3 storage (storage = s3://bucket/prefix)")
        if not 1 <= self.s3_presign_seconds <= 604800:
            raise ValueError(f"s3_presign_seconds must be 1 to 604800 (7 days), not {self.s3_presign_seconds}")
        if self.s3_addressing_style not in ("auto", "path", "virtual"):
            raise ValueError(f"s3_addressing_style must be 'auto', 'path' or 'virtual', not {self.s3_addressing_style!r}")
        from easel.store.notify import choose_backend, redact

        choose_backend(self.live_push, self.redis_url, self.database_url)  # ValueError naming the setting
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"EASEL_REDIS_URL must be a redis://, rediss:// or unix:// URL, not {redact(self.redis_url)[:60]!r}")
        if not self.live_fallback_poll_interval > 0:
            raise ValueError("EASEL_LIVE_FALLBACK_POLL_INTERVAL must be a positive number of seconds")
        for name in ("api_processes", "api_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        check_cpu_precision(self.cpu_precision)
        if not self.openai_wait_seconds > 0:
            raise ValueError(f"openai_wait_seconds must be a positive number of seconds, not {self.openai_wait_seconds}")
        if self.shutdown_grace_seconds < 0:
            raise ValueError(f"shutdown_grace_seconds must be 0 or more, not {self.shutdown_grace_seconds}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be 'text' or 'json', not {self.log_format!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not {self.log_level!r}")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be 0 (automatic) or more, not {self.torch_threads}")
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
    def user_files_dir(self) -> Path:
        """Files uploaded with ``POST /v1/File/Upload`` (``<data_dir>/userfiles/<file id>/<name>``)."""
        return self.data_dir / "userfiles"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @classmethod
    def from_env(cls, config_file: Path | str | None = None, **overrides) -> "Settings":
        """Build settings from, in increasing precedence: defaults, a TOML config file, ``EASEL_*``
        environment variables, then ``overrides`` (CLI flags; a ``None`` value means "not given"
        and overrides nothing).

        Args:
            config_file: TOML file of ``field = value`` lines (the field names above); default
                ``$EASEL_CONFIG_FILE`` if set, else none.

        Raises:
            ValueError: a value of the wrong type (the message names the variable), or an
                unknown key in the config file.
        """
        return cls(**{**read_sources(config_file), **{k: v for k, v in overrides.items() if v is not None}})

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX_SEGMENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


def parse_s3_url(value: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of ``s3://bucket/prefix`` (the prefix may be empty or several segments).

    Raises:
        ValueError: not an ``s3://`` URL, a bucket name outside S3's rules (3 to 63 lower-case
            letters, digits, ``.`` and ``-``), or a prefix with an unsafe or empty segment or over
            120 characters.
    """
    if not isinstance(value, str) or not value.startswith("s3://"):
        raise ValueError(f"storage must be 'local' or 's3://bucket/prefix', not {value!r}")
    bucket, _, prefix = value[len("s3://"):].partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ValueError(f"storage {value!r}: the bucket name must be 3 to 63 lower-case letters, digits, "
                         "'.' and '-', starting and ending with a letter or digit")
    prefix = prefix.strip("/")
    if prefix and (len(prefix) > 120 or not all(_PREFIX_SEGMENT.match(p) for p in prefix.split("/"))):
        raise ValueError(f"storage {value!r}: the prefix must be at most 120 characters of A-Z a-z 0-9 . _ - "
                         "in /-separated segments, none empty or starting with '.'")
    return bucket, prefix


def _split(value):
    if isinstance(value, str):
        return tuple(x.strip() for x in value.split(",") if x.strip())
    return tuple(value)


def read_sources(config_file: Path | str | None = None) -> dict:
    """The settings given in the config file and the environment (only those given), validated
    and typed by ``pydantic-settings``; see :meth:`Settings.from_env`."""
    from typing import Annotated, Optional, get_type_hints

    from pydantic import BeforeValidator, ValidationError, create_model
    from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict
    from pydantic_settings import TomlConfigSettingsSource

    hints = get_type_hints(Settings)
    fields: dict = {}
    for f in dataclasses.fields(Settings):
        kind = hints[f.name]
        if kind == tuple[str, ...]:  # comma-separated in the environment, a list in TOML
            kind = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_split)]
        fields[f.name] = (Optional[kind], None)
    path = config_file or os.environ.get("EASEL_CONFIG_FILE") or None

    class _Base(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="EASEL_", extra="forbid", toml_file=path,
                                          case_sensitive=False)

        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                       file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
            sources = [env_settings]
            if path:
                if not Path(path).is_file():
                    raise ValueError(f"config file {path} does not exist")
                sources.append(TomlConfigSettingsSource(settings_cls))
            return tuple(sources)

    model = create_model("EnvSettings", __base__=_Base, **fields)
    try:
        loaded = model()
    except ValidationError as exc:
        problems = "; ".join(f"EASEL_{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"invalid Easel settings: {problems}") from None
    return {name: getattr(loaded, name) for name in loaded.model_fields_set}
