"""The store's rules on status: one writer (the lifecycle's steps), a CHECK constraint on the
column (migration 0009, SQLite and PostgreSQL), the webhook deliveries' state machine, typed rows."""
from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from easel.clock import ManualClock
from easel.config import Settings
from easel.store import DeliveryStatus, Note, Step, Store, TaskRow, TaskStatus
from easel.store.rows import EventRow, OutputRow
from easel.tasks import lifecycle as lc


def _queued(store, callback=""):
    p = store.create_project("p")
    return lc.submit(store, project_id=p.id, tool="wiro/x", parameters={}, inputs={}, callbackurl=callback,
                     cost_per_second=0)[0]


def _ended_with_webhook(store):
    task = _queued(store, callback="https://example.com/hook")
    assert lc.cancel(store, task.id)
    [delivery] = store.deliveries(task.id)
    assert delivery.status == DeliveryStatus.PENDING
    return task, delivery


def test_the_status_enum_is_the_lifecycle_table():
    assert set(lc.TRANSITIONS) == set(TaskStatus)
    assert [s.value for s in lc.RUNNING] == ["task_accept", "task_preprocess_start", "task_preprocess_end",
                                             "task_assign", "task_start", "task_output", "task_output_full",
                                             "task_error_full", "task_end", "task_postprocess_start"]
    assert f"{lc.QUEUE}" == "task_queue" and lc.ERROR == "task_error" and lc.ERROR not in set(TaskStatus)


def test_a_step_has_no_free_status_and_names_what_is_wrong():
    with pytest.raises(ValueError, match="'status' is not a free value"):
        Step(TaskStatus.CANCEL, (TaskStatus.QUEUE,), values={"status": "task_queue"})
    with pytest.raises(ValueError, match="'status' is not a free value"):
        Note("task_error", lc.RUNNING, values={"status": "task_queue"})
    with pytest.raises(ValueError, match="task_bogus"):
        Step("task_bogus", (TaskStatus.QUEUE,))
    with pytest.raises(ValueError, match="only_from is empty"):
        Step(TaskStatus.CANCEL, ())
    with pytest.raises(ValueError, match="may move to task_start"):  # a policy the table forbids
        lc.step(lc.START, among=(lc.QUEUE,))
    with pytest.raises(TypeError):
        lc.advance(None, 1, lc.CANCEL, status="task_queue")  # status twice: never a free value


def test_cancel_requeue_and_kill_follow_the_table(store):
    clock = ManualClock()
    task = _queued(store)
    assert not lc.request_kill(store, task.id)  # queued: nothing to kill
    assert lc.claim(store, "w1", 10, clock=clock) == task.id
    assert not lc.cancel(store, task.id, clock=clock)  # Cancel is for queued tasks only
    assert lc.request_kill(store, task.id) and store.kill_requested(task.id)
    assert lc.requeue(store, store.get_task(task.id), clock=clock)  # never started: back to the queue
    assert store.get_task(task.id).status == lc.QUEUE
    assert lc.cancel(store, task.id, clock=clock)
    ended = store.get_task(task.id)
    assert ended.status == lc.CANCEL and ended.canceltime == clock.now()
    assert not lc.requeue(store, ended, clock=clock) and not lc.request_kill(store, task.id)
    assert [e.type for e in store.events(task.id)] == [lc.QUEUE, lc.ACCEPT, lc.QUEUE, lc.CANCEL]


def test_the_database_refuses_a_status_outside_the_enum(store):
    task = _queued(store)
    with pytest.raises(IntegrityError, match="ck_tasks_status"):
        with store.engine.begin() as conn:
            conn.execute(text("UPDATE tasks SET status = 'task_bogus' WHERE id = :i"), {"i": task.id})
    assert store.get_task(task.id).status == lc.QUEUE


def test_reads_return_typed_rows(store):
    task = _queued(store)
    assert isinstance(task, TaskRow) and task == store.get_task(task.id) == store.get_task(token=task.socketaccesstoken)
    assert store.tasks_of(task.project_id) == [task]
    store.add_outputs(task.id, [{"name": "0.png", "contenttype": "image/png", "size": 3, "path": "x/0.png"}])
    [out] = store.outputs(task.id)
    assert isinstance(out, OutputRow) and out.name == "0.png" and store.outputs_of([task.id]) == {task.id: [out]}
    [event] = store.events(task.id)
    assert isinstance(event, EventRow) and (event.type, event.seq, event.preview) == (lc.QUEUE, 1, None)
    with pytest.raises(AttributeError):
        task.status = lc.CANCEL  # read-only


def test_a_delivery_moves_only_along_its_state_machine(store):
    task, d = _ended_with_webhook(store)
    assert store.settle_delivery(d.id, DeliveryStatus.PENDING, attempts=1, last_error="HTTP 500")  # a retry
    assert store.settle_delivery(d.id, DeliveryStatus.DELIVERED, attempts=2, last_error="")
    for later in DeliveryStatus:  # delivered is final
        assert not store.settle_delivery(d.id, later)
    assert store.drop_deliveries(task.id) == 0
    [after] = store.deliveries(task.id)
    assert (after.status, after.attempts) == (DeliveryStatus.DELIVERED, 2)
    with pytest.raises(TypeError):
        store.settle_delivery(d.id, DeliveryStatus.FAILED, status="pending")  # one status per write
    with pytest.raises(ValueError):
        store.settle_delivery(d.id, "lost")


def test_dropping_deliveries_settles_only_pending_ones(store):
    task, d = _ended_with_webhook(store)
    assert store.drop_deliveries(task.id) == 1
    assert store.deliveries(task.id)[0].status == DeliveryStatus.DROPPED
    assert not store.settle_delivery(d.id, DeliveryStatus.DELIVERED)


def _migrate_0008_rows_then_head(url: str) -> Store:
    from alembic import command
    from alembic.config import Config

    import easel.store as store_pkg

    store = Store(url)
    cfg = Config(str(store_pkg.HERE / "alembic.ini"))
    cfg.set_main_option("script_location", str(store_pkg.HERE / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url)
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        cfg.attributes["secret_box"] = store.secret_box(create=True)
        command.upgrade(cfg, "0008_sealed_secrets")
        conn.execute(text("INSERT INTO projects (id, name, apikey, apisecret, auth_mode, nonce_policy, created_at, "
                          "task_count) VALUES (1, 'p', 'sha256:x', 's', 'apikey', 'lenient', 0, 1)"))
        conn.execute(text("INSERT INTO tasks (id, uuid, project_id, tool, socketaccesstoken, file_accesskey, status, "
                          "parameters, inputs, callbackurl, debugoutput, debugerror, progress, cost_per_second, "
                          "kill_requested, worker_id, createtime, event_seq, queue_seq) VALUES (7, 'u7', 1, 'wiro/x', "
                          "'s7', 'f7', 'task_output', '{}', '{}', '', '', '', '', 0, false, 'w', 1, 1, 1)"))
        command.upgrade(cfg, "head")
        command.downgrade(cfg, "0008_sealed_secrets")  # and back: the constraint goes, the rows stay
        command.upgrade(cfg, "head")
    return store


def test_migration_0009_keeps_rows_and_indexes_on_sqlite(tmp_path):
    from sqlalchemy import inspect

    store = _migrate_0008_rows_then_head(Settings(data_dir=tmp_path).core.database_url)
    try:
        assert store.get_task(7).status == lc.OUTPUT
        with store.engine.connect() as conn:
            indexes = {i["name"] for i in inspect(conn).get_indexes("tasks")}
            checks = {c["name"] for c in inspect(conn).get_check_constraints("tasks")}
        assert {"ix_tasks_status_queue_seq", "ix_tasks_project_tool_id", "ix_tasks_socketaccesstoken"} <= indexes
        assert checks == {"ck_tasks_status"}
        with pytest.raises(IntegrityError, match="ck_tasks_status"):
            with store.engine.begin() as conn:
                conn.execute(text("UPDATE tasks SET status = 'task_bogus' WHERE id = 7"))
    finally:
        store.engine.dispose()


def test_migration_0009_on_postgresql():
    from pg import create_database

    url, drop = create_database()
    store = None
    try:
        store = _migrate_0008_rows_then_head(url)
        assert store.get_task(7).status == lc.OUTPUT
        with pytest.raises(IntegrityError, match="ck_tasks_status"):
            with store.engine.begin() as conn:
                conn.execute(text("UPDATE tasks SET status = 'task_bogus' WHERE id = 7"))
    finally:
        if store is not None:
            store.engine.dispose()
        drop()


def test_a_failing_webhook_is_retried_then_given_up_on_a_moved_clock(tmp_path):
    from easel.api.webhooks import WebhookDispatcher

    settings = Settings(data_dir=tmp_path, fetch_allow=("127.0.0.1",), webhook_backoff_seconds=10,
                        webhook_max_age_seconds=100)
    clock = ManualClock()
    store = Store(settings.core.database_url, clock=clock)
    store.migrate()
    try:
        task = _queued(store, callback="http://127.0.0.1:9/hook")  # nothing listens: refused at once
        assert lc.cancel(store, task.id, clock=clock)
        dispatcher = WebhookDispatcher(settings, store, lambda tid: {"id": str(tid)}, clock=clock)
        assert dispatcher.run_once() == 1
        [d] = store.deliveries(task.id)
        assert (d.status, d.attempts, d.next_attempt_at) == (DeliveryStatus.PENDING, 1, clock.now() + 10)
        assert dispatcher.run_once() == 0  # not due before its backoff
        clock.advance(10)
        assert dispatcher.run_once() == 1
        [d] = store.deliveries(task.id)
        assert (d.status, d.attempts, d.next_attempt_at) == (DeliveryStatus.PENDING, 2, clock.now() + 20)
        clock.advance(95)  # the next backoff would end past webhook_max_age_seconds
        assert dispatcher.run_once() == 1
        [d] = store.deliveries(task.id)
        assert d.status == DeliveryStatus.FAILED and d.last_error.startswith("gave up after 3 attempts")
        assert dispatcher.run_once() == 0 and not store.settle_delivery(d.id, DeliveryStatus.PENDING)
    finally:
        store.engine.dispose()
