"""Executors deliver queued task ids to workers. ``local`` runs worker processes on this machine;
``celery`` publishes the ids to a broker (Redis or RabbitMQ) whose ``easel worker`` processes, on
any machine sharing the database, claim and run them (``easel.executors.celery``).

The store stays the source of truth: an executor only delivers ids, and a worker claims a task
through :mod:`easel.tasks.lifecycle` before running it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod


class Executor(ABC):
    """Starts workers and tells them about new tasks; the store remains the source of truth."""

    @abstractmethod
    def start(self) -> None:
        """Start the workers (they pick up any task already queued)."""

    @abstractmethod
    def submit(self, task_id: int) -> None:
        """Deliver a newly stored task id (a hint: workers also poll the store)."""

    def maintain(self) -> None:
        """Periodic upkeep, called by every API process's maintenance thread (every quarter of
        ``Settings.worker.lease_seconds``); e.g. publish queued tasks whose delivery is missing. Raises on
        store or broker errors (the caller logs and retries)."""

    def health(self) -> tuple[bool, str]:
        """``(ok, reason)``: whether a worker can run tasks now (``/healthz`` answers 503 if not)."""
        return True, "ok"

    def ready(self) -> dict:
        """``{"ready": bool, "workers": [{"id", "state", "warm"}], "warm": [tools]}`` for
        ``/readyz``: whether a worker of this executor can start a task now (torch imported,
        ``Settings.worker.preload`` loaded) and which tools' pipelines are warm. By default: the
        health, with no detail."""
        ok, _why = self.health()
        return {"ready": ok, "workers": [], "warm": []}

    @abstractmethod
    def stop(self, timeout: float = 10.0) -> None:
        """Stop the workers. A task still running is abandoned at its next denoising step and ended
        as failed (or, if its worker cannot be reached, at the next start)."""


def create_executor(name: str, settings) -> Executor:
    """The executor named ``name``: ``local`` (worker processes) or ``celery`` (a broker).

    Raises:
        ValueError: another name.
    """
    if name == "local":
        from .local import LocalExecutor

        return LocalExecutor(settings)
    if name == "celery":
        from .celery import CeleryExecutor

        return CeleryExecutor(settings)
    raise ValueError(f"executor must be 'local' or 'celery', not {name!r}")
