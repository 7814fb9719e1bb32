"""Webhook delivery: at least once, signed, retried with exponential backoff, durable.

A terminal transition (``task_postprocess_end`` or ``task_cancel``) of a task with a
``callbackUrl`` inserts a pending ``webhook_deliveries`` row in the same transaction
(a lifecycle step with ``webhook``: ``easel.store.deliveries.enqueue``). Every API process runs one :class:`WebhookDispatcher`
thread that leases due rows (a conditional UPDATE, so two processes never send the same attempt)
and POSTs the task object (the Task/Detail ``tasklist`` item) with Standard Webhooks headers
(``easel.signing``). The body is frozen at the first attempt, so every retry carries the same
``webhook-id`` and bytes and receivers can deduplicate. A 2xx answer ends the delivery; anything
else (including a redirect, which is not followed) schedules the next attempt after
``backoff × 2^(attempt-1)`` seconds (capped at 10 minutes) until ``webhook_max_age_seconds`` have
passed since the task ended. Rows survive restarts: a pending row is picked up again.

A delivery's status moves only through ``Store.settle_delivery`` along
``easel.store.status.DELIVERY_TRANSITIONS`` (``pending`` -> ``pending`` for a retry, or to
``delivered``, ``failed`` or ``dropped``); this module decides which, from each attempt's outcome.

The URL is handled as hostile, exactly like LoRA URLs: only http(s), the host must resolve to
public addresses unless allow-listed (``--fetch-allow``), and the connection is pinned to the
vetted address. A refused URL fails the delivery at once (``last_error`` says why).
"""
from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from easel import metrics
from easel.clock import SYSTEM, Clock
from easel.config import Settings
from easel.net.fetch import FetchError, FetchPolicy, URLRefused, check_url, post_pinned
from easel.signing import webhook_signature
from easel.store import DeliveryStatus, Store, WebhookDelivery

log = logging.getLogger("easel.webhooks")
MAX_BACKOFF = 600.0
CHECK_SECONDS = 5.0  # longest a Run waits on resolving its callbackUrl's host


class WebhookDispatcher:
    """Sends due webhook deliveries from the store; call :meth:`run_once` or :meth:`start`."""

    def __init__(self, settings: Settings, store: Store, task_object: Callable[[int], dict | None],
                 clock: Clock = SYSTEM):
        """``task_object(task_id)`` returns the Task/Detail item (None if the task is gone);
        ``clock`` says when deliveries are due and stamps the attempts (:mod:`easel.clock`).
        Keeps only ``settings.api`` (the ``webhook_*`` fields) and ``settings.fetch.fetch_allow``."""
        self.clock = clock
        self.api = settings.api
        self.allow = settings.fetch.fetch_allow
        self.store = store
        self.task_object = task_object
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def policy(self) -> FetchPolicy:
        timeout = self.api.webhook_timeout
        return FetchPolicy(allow=self.allow, connect_timeout=timeout, read_timeout=timeout, total_timeout=timeout)

    def start(self, interval: float = 0.25, idle_cap: float = 1.0) -> None:
        """Run the dispatcher in a daemon thread: every ``interval`` s after work, backing off to
        ``idle_cap`` s while nothing is due (an idle server then makes one query per second)."""
        def loop():
            delay = interval
            while not self._stop.wait(delay):
                try:
                    delay = interval if self.run_once() else min(idle_cap, delay * 1.5)
                except Exception:  # never let the loop die (e.g. database briefly locked)
                    log.exception("webhook dispatcher iteration failed")

        self._thread = threading.Thread(target=loop, name="easel-webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)

    def run_once(self) -> int:
        """Attempt every due delivery once; return how many were attempted."""
        now = self.clock.now()
        # the lease outlasts an attempt (whose total deadline is webhook_timeout), so no other
        # dispatcher takes a delivery that is still being sent
        due = self.store.lease_due_deliveries(now, lease_seconds=self.api.webhook_timeout * 3 + 5,
                                              limit=max(20, self.api.webhook_concurrency))
        if len(due) <= 1:
            for delivery in due:
                self._attempt(delivery)
            return len(due)
        # concurrently: one slow receiver must not delay everybody else's webhooks
        with ThreadPoolExecutor(max_workers=max(1, self.api.webhook_concurrency),
                                thread_name_prefix="easel-webhook") as pool:
            for future in [pool.submit(self._attempt, d) for d in due]:
                try:
                    future.result()
                except Exception:
                    log.exception("webhook attempt failed")
        return len(due)

    def _attempt(self, d: WebhookDelivery) -> None:
        store = self.store
        payload = d.payload
        if payload is None:
            obj = self.task_object(d.task_id)
            if obj is None:
                store.settle_delivery(d.id, DeliveryStatus.FAILED, last_error="task no longer exists")
                return
            payload = json.dumps(obj, separators=(",", ":"), sort_keys=True)
        secret = self._secret(d.task_id)
        body = payload.encode()
        stamp = int(self.clock.now())
        headers = {"content-type": "application/json", "user-agent": "Easel-Webhooks/1",
                   "webhook-id": d.id, "webhook-timestamp": str(stamp),
                   "webhook-signature": webhook_signature(secret, d.id, stamp, body)}
        attempts = d.attempts + 1
        try:
            status = post_pinned(d.url, body, headers, self.policy)
            error = "" if 200 <= status < 300 else f"HTTP {status}"
        except URLRefused as exc:  # retrying cannot help
            store.settle_delivery(d.id, DeliveryStatus.FAILED, attempts=attempts, payload=payload, last_error=str(exc))
            metrics.webhook_attempt("refused")
            return
        except FetchError as exc:
            error = str(exc)
        if not error:
            store.settle_delivery(d.id, DeliveryStatus.DELIVERED, attempts=attempts, payload=payload, last_error="",
                                  delivered_at=self.clock.now())
            metrics.webhook_attempt("delivered")
            return
        delay = min(MAX_BACKOFF, self.api.webhook_backoff_seconds * 2 ** (attempts - 1))
        if self.clock.now() + delay - d.created_at > self.api.webhook_max_age_seconds:
            store.settle_delivery(d.id, DeliveryStatus.FAILED, attempts=attempts, payload=payload,
                                  last_error=f"gave up after {attempts} attempts: {error}")
            metrics.webhook_attempt("failed")
        else:
            metrics.webhook_attempt("retry")
            store.settle_delivery(d.id, DeliveryStatus.PENDING, attempts=attempts, payload=payload, last_error=error,
                                  next_attempt_at=self.clock.now() + delay)

    def _secret(self, task_id: int) -> str:
        task = self.store.get_task(task_id)
        project = self.store.project_by_id(task.project_id) if task else None
        return project.apisecret if project else ""


def callback_url(value, settings: Settings) -> str:
    """The ``callbackUrl`` a Run stores ("" for none), checked when the Run is submitted under
    the policy the deliveries use, so a URL that would never be delivered is refused at once.

    Empty, or text with no URL scheme at all (the seeds send the sentence "You can provide a
    callback URL; ..." in this field), means no webhook, as before. A URL the fetch policy
    refuses (a scheme other than http(s), no host, a loopback, private, link-local or other
    non-public address that ``--fetch-allow`` does not list) is refused. A host that does not
    resolve now is accepted (it may resolve when the task ends; the delivery then retries).

    Raises:
        WiroError: code 0, naming ``callbackUrl`` and the reason.
    """
    from urllib.parse import urlsplit

    from .errors import WiroError

    url = str(value if value is not None else "").strip()
    try:
        scheme = urlsplit(url).scheme
    except ValueError as exc:  # e.g. an invalid IPv6 literal
        raise WiroError(0, f"Request parameter [callbackUrl] is not a valid URL: {exc}") from None
    if not url or not scheme:
        return ""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise WiroError(0, "Request parameter [callbackUrl] is not a valid URL: it contains a control character.")
    policy = FetchPolicy(allow=settings.fetch.fetch_allow)
    try:
        check_url(url, policy, min(CHECK_SECONDS, settings.api.webhook_timeout))
    except URLRefused as exc:
        raise WiroError(0, f"Request parameter [callbackUrl] cannot receive webhooks: {exc}. Send a public "
                           "http(s) URL (the operator can allow a host with --fetch-allow).") from None
    except FetchError as exc:  # not resolvable now: deliveries retry
        log.info("callbackUrl %r not checked: %s", url[:200], exc)
    except ValueError as exc:  # a port out of range, a malformed host
        raise WiroError(0, f"Request parameter [callbackUrl] is not a valid URL: {exc}") from None
    return url
