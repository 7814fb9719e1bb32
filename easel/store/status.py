"""The values the status columns may hold, and the writes the store accepts for them.

The store knows which strings a status column may hold (:class:`TaskStatus`, enforced by the
CHECK constraint of migration 0009), not which changes are legal: that is the lifecycle's
transition table (``easel.tasks.lifecycle``), which builds every change as a :class:`Step` (or
an event without a change, a :class:`Note`). The store only applies what it is given; it has no
free-form status write. Webhook deliveries are simpler and the store owns their small state
machine (:data:`DELIVERY_TRANSITIONS`, written only by ``Deliveries.settle``).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache


class TaskStatus(StrEnum):
    """A task's status, as stored and as Wiro answers it (``tasklist[].status``)."""

    QUEUE = "task_queue"
    ACCEPT = "task_accept"
    PREPROCESS_START = "task_preprocess_start"
    PREPROCESS_END = "task_preprocess_end"
    ASSIGN = "task_assign"
    START = "task_start"
    OUTPUT = "task_output"
    OUTPUT_FULL = "task_output_full"
    ERROR_FULL = "task_error_full"
    END = "task_end"
    POSTPROCESS_START = "task_postprocess_start"
    POSTPROCESS_END = "task_postprocess_end"
    CANCEL = "task_cancel"


def statuses(values) -> tuple[str, ...]:
    """``values`` (statuses, any iterable) as plain strings, each checked.

    Each distinct tuple is checked once (a Run, a claim and a lease renewal pass the same few
    constants: ``TaskStatus(v)`` per value and call was the one cost the typed status added to a
    Run, issue 22's benchmark).

    Raises:
        ValueError: one is not a :class:`TaskStatus` value (names it)."""
    values = tuple(values)
    try:
        return _checked(values)
    except TypeError:  # an unhashable value: checked without the cache (and refused)
        return tuple(TaskStatus(v).value for v in values)


@lru_cache(maxsize=256)
def _checked(values: tuple) -> tuple[str, ...]:
    return tuple(TaskStatus(v).value for v in values)


@lru_cache(maxsize=256)
def _guard(only_from: tuple) -> tuple[str, ...]:
    out = statuses(only_from)
    if not out:
        raise ValueError("a step needs the statuses it may be taken from (only_from is empty)")
    return out


def _free(values: Mapping[str, object]) -> dict:
    if "status" in values:
        raise ValueError("'status' is not a free value: the step's status is set by the step itself")
    return dict(values)


@dataclass(slots=True)
class Step:
    """One status change of one task, built by the lifecycle from its transition table.

    ``status``: the new status; ``only_from``: the statuses it may be taken from (the write is
    conditional on them); ``message``: the event's message (JSON text or ""); ``webhook``: queue
    the task's webhook in the same transaction; ``values``: other columns to set (never
    ``status``; times in Unix seconds).

    Raises:
        ValueError: a status is not a :class:`TaskStatus`, ``only_from`` is empty, or ``values``
            holds ``status``.
    """

    status: str
    only_from: tuple[str, ...]
    message: str = ""
    webhook: bool = False
    values: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.status = TaskStatus(self.status).value
        self.only_from = _guard(tuple(self.only_from))
        self.values = _free(self.values)


@dataclass(slots=True)
class Note:
    """An event appended to a task without changing its status (progress before the first step,
    a ``task_error`` log line): ``type`` is the event type, ``only_from`` the statuses the task
    must be in, ``values`` other columns to set (never ``status``).

    Raises:
        ValueError: as :class:`Step`.
    """

    type: str
    only_from: tuple[str, ...]
    message: str = ""
    values: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.only_from = _guard(tuple(self.only_from))
        self.values = _free(self.values)


class DeliveryStatus(StrEnum):
    """A webhook delivery's status: ``pending`` (waiting for its next attempt), ``delivered``,
    ``failed`` (gave up, or the URL was refused) or ``dropped`` (the task's data was deleted first)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    DROPPED = "dropped"


# pending -> pending is a retry (attempts, next attempt); the others end the delivery
DELIVERY_TRANSITIONS: dict[DeliveryStatus, frozenset[DeliveryStatus]] = {
    DeliveryStatus.PENDING: frozenset(DeliveryStatus),
    DeliveryStatus.DELIVERED: frozenset(),
    DeliveryStatus.FAILED: frozenset(),
    DeliveryStatus.DROPPED: frozenset(),
}


def delivery_from(status: DeliveryStatus | str) -> tuple[str, ...]:
    """The delivery statuses from which a delivery may move to ``status``.

    Raises:
        ValueError: ``status`` is not a :class:`DeliveryStatus` value."""
    status = DeliveryStatus(status)
    return tuple(s.value for s, nexts in DELIVERY_TRANSITIONS.items() if status in nexts)
