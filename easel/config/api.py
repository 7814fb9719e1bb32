"""``Settings.api``: what the API processes read (HTTP limits, auth, the OpenAI routes, webhooks)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ApiSettings:
    """The API processes' settings.

    Attributes:
        api_processes: API processes ``easel serve`` runs on the one port (the kernel spreads
            connections over them; they share the store, and the local workers belong to the
            serving parent process, whichever API process took the Run).
        api_threads: Threads of each API process that run store calls (requests' synchronous
            parts); the process's database connection pool holds as many connections.
        cors_origins: Browser origins allowed to call the API cross-origin (CORS, with preflight
            answers); empty (the default) sends no CORS headers; ``*`` allows any origin.
        ws_path: Path of the WebSocket endpoint (Wiro's is ``wss://socket.wiro.ai/v1``).
        metrics_token: When set, ``/metrics`` answers only requests with ``Authorization: Bearer
            <metrics_token>`` (HTTP 401 otherwise); empty (default) = open, like ``/healthz``.
        nonce_window_seconds / nonce_retention_seconds: For projects with the ``strict`` nonce
            policy: a timestamp nonce must be within ``nonce_window_seconds`` of now; every nonce
            is remembered (and refused again) for ``nonce_retention_seconds``. The default
            ``lenient`` policy uses neither.
        max_concurrent_tasks: Unfinished tasks one project may have (queued or running) before
            Run answers Wiro's code 96; 0 = unlimited.
        rate_limit_per_minute: Requests one API key may make per minute to one API process
            before HTTP 429 with ``Retry-After``; 0 = unlimited.
        request_max_bytes: Largest request body (files included) the API reads; larger bodies
            are refused with HTTP 413 while streaming, before they are buffered.
        body_max_bytes: Largest JSON or URL-encoded body (no files: a JSON object sent under a
            multipart content type too) and largest text part of a multipart body; refused
            with HTTP 413 while streaming. Much lower than ``request_max_bytes``, which
            bounds bodies that carry files.
        default_cost_per_second: Cost per second of run time for tools that set none.
        openai_wait_seconds: Longest an OpenAI Images API request (``/v1/images/...``) holds for its
            task's end (``Prefer: wait=N`` lowers it per request); past it, HTTP 504 with the Wiro
            task id, and the task keeps running.
        openai_kill_on_disconnect: Stop (cancel or kill) an OpenAI Images API request's task when its
            client disconnects before the end; off by default (the task runs on, as a Wiro Run's).
        webhook_max_age_seconds: How long a webhook is retried (exponential backoff from
            ``webhook_backoff_seconds``, doubling, capped at 10 minutes) before it is given up.
        webhook_timeout: Seconds per webhook attempt.
        webhook_concurrency: Webhook attempts sent at the same time by one API process.
    """

    api_processes: int = 1
    api_threads: int = 16
    cors_origins: tuple[str, ...] = field(default_factory=tuple)
    ws_path: str = "/v1"
    metrics_token: str = ""
    nonce_window_seconds: int = 300
    nonce_retention_seconds: int = 86400
    max_concurrent_tasks: int = 0
    rate_limit_per_minute: int = 0
    request_max_bytes: int = 256 * 1024**2
    body_max_bytes: int = 1024**2
    default_cost_per_second: float = 0.000585
    openai_wait_seconds: float = 600.0
    openai_kill_on_disconnect: bool = False
    webhook_max_age_seconds: float = 24 * 3600.0
    webhook_backoff_seconds: float = 5.0
    webhook_timeout: float = 10.0
    webhook_concurrency: int = 8

    def __post_init__(self) -> None:
        for name in ("api_processes", "api_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not self.openai_wait_seconds > 0:
            raise ValueError(f"openai_wait_seconds must be a positive number of seconds, not {self.openai_wait_seconds}")
