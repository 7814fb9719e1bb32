"""What the HTTP layer is given: one typed :class:`Services` object per app, on ``app.state.services``.

Routes reach it through :func:`easel.api.deps.services` (a FastAPI dependency); nothing else holds
it. Each field is one collaborator with one job; the helpers that combine them (a task's Wiro
view, finding a task, deleting its files) are functions in :mod:`easel.api.views`, not methods
here.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, TypeVar

from prometheus_client import CollectorRegistry

from easel.catalog import ModelCatalog, ToolSpec, load_tools
from easel.clock import SYSTEM, Clock
from easel.config import Settings
from easel.diskfull import DiskWatch
from easel.executors import Executor
from easel.storage import Storage, create_storage
from easel.store import SecretBox, Store
from easel.store.hub import Hub
from easel.store.notify import Publisher

from .auth import ProjectCache
from .maintenance import Maintenance
from .ratelimit import RateLimiter
from .webhooks import WebhookDispatcher

T = TypeVar("T")


@dataclass(eq=False)
class Services:
    """The collaborators of one API app (built by :meth:`build`; fields are never reassigned
    except :attr:`threads`, which the lifespan recreates when an app is started again).

    Attributes:
        settings: the server's settings.
        store: the task database (one connection per thread that may use it at once).
        wakeups: pushed wake-ups of task waiters (:mod:`easel.store.notify`; polling when none).
        projects: projects by API key, cached for :data:`easel.api.auth.PROJECT_TTL` seconds.
        catalog: the model catalog (which models a tool's selects may name, their sources).
        tools: the tool specs by name (runnable ones have a ``module``).
        storage: where outputs and uploads live (local disk or S3).
        executor: told about new tasks; None when workers of another process poll the store.
        limiter: the per-key rate limit (HTTP 429).
        disk: notices a full disk (HTTP 507 and ``/healthz``).
        threads: the threads that run requests' store calls (asyncio's executor: a hop costs about
            40 % less CPU than anyio's thread pool).
        webhooks: the webhook sender (started by the lifespan when asked).
        maintenance: retention sweeper and lease upkeep (started by the lifespan).
        store_metrics: the registry of the store's gauges served at ``/metrics``.
        clock: where auth and the rate limit read the time (tests pass a ManualClock).
    """

    settings: Settings
    store: Store
    wakeups: Hub
    projects: ProjectCache
    catalog: ModelCatalog
    tools: dict[str, ToolSpec]
    storage: Storage
    executor: Executor | None
    limiter: RateLimiter
    disk: DiskWatch
    threads: ThreadPoolExecutor
    webhooks: WebhookDispatcher
    maintenance: Maintenance
    store_metrics: CollectorRegistry
    clock: Clock = SYSTEM

    @classmethod
    def build(cls, settings: Settings, executor: Executor | None = None, clock: Clock = SYSTEM) -> Services:
        """Open the store and storage and build every collaborator (nothing is started: the
        app's lifespan starts the webhook sender, the upkeep thread and the wake-up listener).

        Raises whatever opening the store or the storage raises (a bad URL, an unreachable bucket)."""
        from . import views
        from .metrics import StoreCollector

        # a connection for each thread that may use the store at once: the request threads, the
        # webhook senders, upkeep and metrics (no connection is opened and closed per request)
        store = Store(settings.core.database_url, pool_size=settings.api.api_threads + settings.api.webhook_concurrency + 4,
                      wakeups=Publisher.for_settings(settings.live, settings.core.database_url), secrets=SecretBox.for_settings(settings.core))
        storage = create_storage(settings)
        disk = DiskWatch(settings.core.data_dir)
        tools = load_tools()
        holder: list[Services] = []  # the webhook sender and the sweeper call back into the views

        def task_object(task_id: int) -> dict | None:
            return views.task_object(holder[0], task_id)

        def delete_files(task) -> None:
            views.delete_files(holder[0], task)

        store_metrics = CollectorRegistry(auto_describe=False)
        store_metrics.register(StoreCollector(store, [name for name, spec in tools.items() if spec.module]))
        services = cls(
            settings=settings, store=store, wakeups=Hub.for_settings(settings.live, settings.core.database_url, store.wakeups),
            projects=ProjectCache(store, clock=clock), catalog=ModelCatalog.load(settings.core.catalog_override),
            tools=tools, storage=storage, executor=executor,
            limiter=RateLimiter(settings.api.rate_limit_per_minute, settings.live.redis_url, settings.live.redis_prefix, clock=clock),
            disk=disk, threads=new_threads(settings),
            webhooks=WebhookDispatcher(settings, store, task_object),
            maintenance=Maintenance(settings, store, delete_files, storage,
                                    executor.maintain if executor is not None else None, disk),
            store_metrics=store_metrics, clock=clock)
        holder.append(services)
        return services

    async def in_thread(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` in one of the API's threads (see ``Settings.api.api_threads``)."""
        return await asyncio.get_running_loop().run_in_executor(self.threads, fn, *args)

    @property
    def auth_needs_io(self) -> bool:
        """Whether the rate limit is checked over the network (in Redis): then no request is
        authenticated on the event loop."""
        return self.limiter.shared is not None


def new_threads(settings: Settings) -> ThreadPoolExecutor:
    """The request threads: ``Settings.api.api_threads`` of them, named ``easel-api-*``."""
    return ThreadPoolExecutor(max_workers=settings.api.api_threads, thread_name_prefix="easel-api")
