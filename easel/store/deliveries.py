"""The webhook queue: one :class:`WebhookDelivery` row per message to a task's ``callbackUrl``.

Deliveries have their own small state machine (:class:`.status.DeliveryStatus`,
:data:`.status.DELIVERY_TRANSITIONS`): a delivery is created ``pending`` (:func:`enqueue`, in
the transaction of the task's terminal step) and changes status only through
:meth:`Deliveries.settle`, conditional on the statuses it may leave.
"""
from __future__ import annotations

import secrets

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from .db import Database, one_of
from .models import WebhookDelivery
from .status import DeliveryStatus, delivery_from

_D = WebhookDelivery.__table__.c
_PENDING = DeliveryStatus.PENDING.value


def enqueue(conn: Connection, task_id: int, url: str, now: float) -> None:
    """Insert a pending delivery of ``task_id``'s webhook to ``url``, due at ``now`` (Unix s), in
    the transaction of ``conn`` (the task's terminal step: a task never loses its webhook)."""
    conn.execute(insert(WebhookDelivery), {
        "id": "msg_" + secrets.token_hex(16), "task_id": task_id, "url": url, "status": _PENDING,
        "attempts": 0, "next_attempt_at": now, "created_at": now, "last_error": ""})


class Deliveries:
    """The webhook deliveries of the database ``db``."""

    def __init__(self, db: Database):
        self.db = db

    def lease_due_deliveries(self, now: float, lease_seconds: float, limit: int = 20) -> list[WebhookDelivery]:
        """Pending deliveries whose time has come (``next_attempt_at`` <= ``now``, Unix s), each
        leased (``next_attempt_at`` pushed by ``lease_seconds``) with a conditional UPDATE so two
        dispatchers never send the same attempt; at most ``limit``, the most overdue first."""
        with self.db.read() as s:
            due = list(s.scalars(select(WebhookDelivery).where(
                WebhookDelivery.status == _PENDING, WebhookDelivery.next_attempt_at <= now)
                .order_by(WebhookDelivery.next_attempt_at).limit(limit)))
        leased = []
        for d in due:
            with self.db.session() as s:
                res = s.execute(update(WebhookDelivery).where(
                    WebhookDelivery.id == d.id, WebhookDelivery.status == _PENDING,
                    WebhookDelivery.next_attempt_at == d.next_attempt_at).values(next_attempt_at=now + lease_seconds))
                if res.rowcount == 1:
                    leased.append(d)
        return leased

    def settle(self, delivery_id: str, status: DeliveryStatus | str, **values) -> bool:
        """Move a delivery to ``status`` (``pending`` again: a retry) with other columns
        (``attempts``, ``payload``, ``last_error``, ``delivered_at``, ``next_attempt_at``), if
        :data:`.status.DELIVERY_TRANSITIONS` allows it from its current status; False (nothing
        written) otherwise. The only write of a delivery's status.

        Raises:
            ValueError: ``status`` is not a :class:`DeliveryStatus`."""
        status = DeliveryStatus(status)
        with self.db.write() as conn:
            return conn.execute(update(WebhookDelivery).where(
                _D.id == delivery_id, one_of(_D.status, delivery_from(status)))
                .values(status=status.value, **values)).rowcount == 1

    def deliveries(self, task_id: int) -> list[WebhookDelivery]:
        """The task's deliveries (any status)."""
        with self.db.read() as s:
            return list(s.scalars(select(WebhookDelivery).where(WebhookDelivery.task_id == task_id)))

    def drop_deliveries(self, task_id: int) -> int:
        """Settle the task's pending deliveries ``dropped`` (its inputs and outputs were deleted);
        returns how many."""
        dropped = DeliveryStatus.DROPPED
        with self.db.write() as conn:
            return conn.execute(update(WebhookDelivery).where(
                _D.task_id == task_id, one_of(_D.status, delivery_from(dropped)))
                .values(status=dropped.value, last_error="task inputs and outputs were deleted")).rowcount
