"""Executors deliver queued task ids to workers. ``local`` runs worker processes on this machine.

The interface is deliberately small so that a Celery executor (Redis or RabbitMQ broker) can be
added without touching the API or the tools: ``submit`` would send the task id to the broker, and
a Celery task would call ``easel.tasks.runner.Worker.execute`` after claiming that id.
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

    def health(self) -> tuple[bool, str]:
        """``(ok, reason)``: whether a worker can run tasks now (``/healthz`` answers 503 if not)."""
        return True, "ok"

    @abstractmethod
    def stop(self, timeout: float = 10.0) -> None:
        """Stop the workers. A task still running is abandoned at its next denoising step and ended
        as failed (or, if its worker cannot be reached, at the next start)."""


def create_executor(name: str, settings) -> Executor:
    """The executor named ``name`` (only ``local`` for now)."""
    if name == "local":
        from .local import LocalExecutor

        return LocalExecutor(settings)
    raise ValueError(f"executor must be 'local', not {name!r}")
