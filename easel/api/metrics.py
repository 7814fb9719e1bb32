"""``GET /metrics``: Prometheus text exposition of the whole ``easel serve`` process tree.

Two sources are joined at scrape time:

- the samples every process recorded (``easel.metrics``): in prometheus_client's multiprocess
  mode (``easel serve`` sets ``PROMETHEUS_MULTIPROC_DIR``) the API process and its worker
  processes write memory-mapped files and :class:`prometheus_client.multiprocess.MultiProcessCollector`
  sums them; otherwise this process's default registry (with the process/platform collectors);
- :class:`StoreCollector`: queue depth and running tasks per tool, read from the store with one
  grouped query. These describe the whole deployment (every API process and worker on the same
  database), so they are right whichever process is scraped; aggregate them with ``max``, not ``sum``.

:class:`HttpMetrics` is the ASGI middleware that counts requests by route template
(``/v1/Run/{owner}/{slug}``, never the raw path, so label sets stay bounded), method and status.
The route itself is :mod:`easel.api.routes.metrics`; with ``Settings.api.metrics_token`` set it requires
``Authorization: Bearer <token>``.
"""
from __future__ import annotations

import time

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from easel import metrics
from easel.tasks import lifecycle as lc


class StoreCollector:
    """``easel_tasks_queued`` and ``easel_tasks_running`` per tool, from the store at collect time."""

    def __init__(self, store, tools: list[str]):
        self.store = store
        self.tools = tools

    def collect(self):
        counts = self.store.count_by_tool((lc.QUEUE, *lc.RUNNING))
        queued = GaugeMetricFamily("easel_tasks_queued", "Tasks waiting for a worker (status task_queue), "
                                   "per tool; read from the store at scrape time (deployment-wide)", labels=["tool"])
        running = GaugeMetricFamily("easel_tasks_running", "Tasks accepted by a worker and not yet ended, per "
                                    "tool; read from the store at scrape time (deployment-wide)", labels=["tool"])
        tools = sorted(set(self.tools) | {tool for tool, _ in counts})
        for tool in tools:
            queued.add_metric([tool], counts.get((tool, lc.QUEUE), 0))
            running.add_metric([tool], sum(n for (t, status), n in counts.items() if t == tool and status != lc.QUEUE))
        yield queued
        yield running


def exposition(store_registry: CollectorRegistry) -> bytes:
    """The text of one scrape: the processes' samples, then the store's gauges."""
    if metrics.multiprocess_enabled():
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry) + generate_latest(store_registry)


class HttpMetrics:
    """ASGI middleware: ``easel_http_requests_total{route,method,status}`` and request durations."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        began = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "")
            metrics.http_request(route, method, status["code"], time.perf_counter() - began)
