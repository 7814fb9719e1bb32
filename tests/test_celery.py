"""The Celery executor: routing by model family, its settings, the store's dispatch bookkeeping,
publishing (and publishing again) through a real Redis, and ``easel worker`` on a real RabbitMQ:
one task runs, a message delivered twice runs nothing twice, a task queued again by the lease
rules is published again and runs, and a worker killed mid-task loses nothing."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest
from sqlalchemy import update

from conftest import SMALL, TIME_SCALE, TOOL, free_port
from easel.catalog import FAMILIES, ModelCatalog, ToolSpec, load_tools
from easel.clock import ManualClock
from easel.config import Settings
from easel.store import Store, Task
from easel.tasks import lifecycle as lc
from fleet import WorkerProc, rabbitmq_broker, redis_broker


def _submit(store, tool=TOOL, inputs=None, project=None):
    project = project or store.create_project("p")
    task, _ = lc.submit(store, project_id=project.id, tool=tool, parameters={}, inputs=inputs or {},
                        callbackurl="", cost_per_second=0)
    return task


def _age(store, task_id: int, seconds: float) -> None:
    """Make a task look stored ``seconds`` ago (the publisher leaves fresh tasks to their API)."""
    with store.engine.begin() as conn:
        conn.execute(update(Task).where(Task.id == task_id).values(createtime=time.time() - seconds))


# -- routing and settings ------------------------------------------------------------------------

def test_each_seed_request_goes_to_its_model_familys_queue(tmp_path):
    from easel.executors.celery import CeleryExecutor

    executor = CeleryExecutor(Settings(data_dir=tmp_path, queue_prefix="fleet", executor="celery"))
    catalog, tools = ModelCatalog.load(), load_tools()
    expected = {"wiro/text-to-image-sd-lora": "fleet.sd15", "wiro/text-to-image-flux-lora-fast": "fleet.flux",
                "Adel_AI/Comics-Factory-v1": "fleet.flux", "wiro/ic-light-background": "fleet.ic-light",
                "wiro/instant-id-controlnet-lora": "fleet.instantid"}
    routed = {name: executor.queue_for(name, tools[name].validate(dict(tools[name].example.request), catalog))
              for name in expected}  # each tool's example request, from its catalog file
    assert routed == expected
    # a checkpoint chosen by the request decides: an SDXL checkpoint in a tool's model selector
    spec = ToolSpec(owner="o", slug="s", module="m", description="", categories=[], cost_per_second=0,
                    inputs=tools["wiro/text-to-image-sd-lora"].inputs)
    assert spec.model_family({"selectedModel": "79"}, catalog) == "sdxl"  # catalog id 79: an SDXL checkpoint
    assert spec.model_family({"selectedModel": "1"}, catalog) == "sd15"
    assert ToolSpec(owner="o", slug="s", module="m", description="", categories=[], inputs=[], cost_per_second=0,
                    base_model="flux.1-dev").model_family({}, catalog) == "flux"
    assert set(expected.values()) | {"fleet.sdxl"} == {f"fleet.{f}" for f in FAMILIES}


@pytest.mark.parametrize("field, value, message", [
    ("executor", "kubernetes", "executor must be 'local' or 'celery'"),
    ("broker_url", "http://127.0.0.1:6379", "broker_url must be a redis://, rediss://, amqp:// or amqps:// URL"),
    ("queue_prefix", "my fleet", "queue_prefix must be 1 to 40 letters"),
])
def test_fleet_settings_are_checked(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings(data_dir=tmp_path, **{field: value})


def test_queues_are_checked_against_the_tools_families_where_a_worker_starts(tmp_path):
    """The queue names need the catalog: ``check_queues`` (called by ``run_worker`` and at
    ``easel worker``'s start), not the settings, refuses an unknown family."""
    from easel.executors.celery import check_queues

    fleet = Settings(data_dir=tmp_path, queues=("sd15", "sd3")).fleet  # the settings alone take it
    with pytest.raises(ValueError, match="queues must be among sd15, sdxl, flux, ic-light, instantid, not 'sd3'"):
        check_queues(fleet)
    assert check_queues(Settings(data_dir=tmp_path, queues=("flux",)).fleet) == ("flux",)
    assert check_queues(Settings(data_dir=tmp_path).fleet) == tuple(FAMILIES)


def test_the_celery_settings_suit_long_gpu_tasks(tmp_path):
    from easel.executors.celery import celery_config

    redis = celery_config(Settings(data_dir=tmp_path, queue_prefix="f"))
    assert redis["task_acks_late"] and redis["task_reject_on_worker_lost"]
    assert (redis["worker_prefetch_multiplier"], redis["worker_concurrency"], redis["worker_pool"]) == (1, 1, "threads")
    assert redis["worker_cancel_long_running_tasks_on_connection_loss"] is False
    assert redis["accept_content"] == ["json"] and redis["task_ignore_result"]
    # longer than the longest task: the 3600 s task timeout + the lease + 300 s
    assert redis["broker_transport_options"] == {"visibility_timeout": 3930.0, "global_keyprefix": "f:"}
    assert [q.name for q in redis["task_queues"]] == [f"f.{f}" for f in FAMILIES]
    unlimited = celery_config(Settings(data_dir=tmp_path, task_timeout_seconds=0))
    assert unlimited["broker_transport_options"]["visibility_timeout"] == 86400.0
    amqp = celery_config(Settings(data_dir=tmp_path, broker_url="amqp://guest:guest@rabbit//",
                                  broker_visibility_timeout=7200))
    assert amqp["broker_transport_options"] == {}
    assert {q.queue_arguments["x-consumer-timeout"] for q in amqp["task_queues"]} == {7_200_000}


def test_the_cli_names_the_fleet_flags_and_their_values(tmp_path):
    def easel(*args):
        return subprocess.run([sys.executable, "-m", "easel", *args, "--data-dir", str(tmp_path)],
                              capture_output=True, text=True, timeout=120)

    bad_queue = easel("worker", "--queues", "sd15,sd3")
    assert bad_queue.returncode == 2 and "queues must be among sd15, sdxl, flux, ic-light, instantid" in bad_queue.stderr
    assert "Traceback" not in bad_queue.stderr
    workers = easel("serve", "--executor", "celery", "--workers", "2")
    assert workers.returncode == 2 and "--workers 0" in workers.stderr and "easel worker" in workers.stderr


# -- the store's part: claim by id, dispatch bookkeeping -----------------------------------------

def test_a_delivered_id_is_claimed_once_and_only_while_queued(store):
    first, second, cancelled = _submit(store), _submit(store), _submit(store)
    assert lc.cancel(store, cancelled.id)
    assert lc.claim(store, "w1", task_id=second.id) == second.id  # that task, not the oldest
    assert lc.claim(store, "w2", task_id=second.id) is None  # delivered twice: nothing to run
    assert lc.claim(store, "w2", task_id=cancelled.id) is None
    assert lc.claim(store, "w2", task_id=10_000) is None
    assert store.get_task(second.id).worker_id == "w1"
    assert [e.type for e in store.events(second.id)].count(lc.ACCEPT) == 1
    assert lc.claim(store, "w2") == first.id  # the local executor's claim is unchanged


def test_dispatch_bookkeeping_and_a_requeue_forgets_the_publication(store):
    task = _submit(store)
    now = time.time()
    assert [t.id for t in store.due_for_dispatch(lc.QUEUE, now + 1, None)] == [task.id]  # never published
    assert store.due_for_dispatch(lc.QUEUE, now - 60, None) == []  # fresh: its own API publishes it
    assert store.mark_dispatched(task.id, lc.QUEUE, now)
    assert not store.mark_dispatched(task.id, lc.QUEUE, now, due_before=now - 60)  # published recently
    assert store.due_for_dispatch(lc.QUEUE, now + 1, None) == []
    assert [t.id for t in store.due_for_dispatch(lc.QUEUE, now + 1, now + 1)] == [task.id]  # old enough to resend
    assert lc.claim(store, "ghost", lease_seconds=-1, task_id=task.id) == task.id  # its worker died at once
    assert not store.mark_dispatched(task.id, lc.QUEUE, now)  # not queued: never published
    assert lc.expire_leases(store, 1, requeue_unstarted=True) == {task.id: "requeued"}
    again = store.get_task(task.id)
    assert again.status == lc.QUEUE and again.dispatched_at is None


# -- publishing through a real Redis -------------------------------------------------------------

@pytest.fixture
def redis_settings(tmp_path):
    url, prefix, cleanup = redis_broker()
    yield Settings(data_dir=tmp_path, executor="celery", broker_url=url, queue_prefix=prefix)
    cleanup()


def _queue_lengths(settings) -> dict[str, int]:
    import redis

    client = redis.Redis.from_url(settings.fleet.broker_url)
    try:
        return {f: client.llen(f"{settings.fleet.queue_prefix}:{settings.fleet.queue_prefix}.{f}") for f in FAMILIES}
    finally:
        client.close()


def test_the_api_publishes_ids_once_and_again_only_when_due(redis_settings):
    from easel.executors.celery import CeleryExecutor

    store = Store(redis_settings.core.database_url)
    store.migrate()
    api1, api2 = CeleryExecutor(redis_settings), CeleryExecutor(redis_settings)  # two API processes
    try:
        api1.start()
        assert api1.health()[0] and "reachable" in api1.health()[1]
        sd = _submit(store, inputs={"selectedModel": "1"})
        flux = _submit(store, tool="wiro/text-to-image-flux-lora-fast")
        api1.submit(sd.id)
        api2.submit(flux.id)
        assert _queue_lengths(redis_settings) == {**dict.fromkeys(FAMILIES, 0), "sd15": 1, "flux": 1}
        _age(store, sd.id, 60)
        assert api1.maintain() == [] and api2.maintain() == []  # both were published just now
        # the API that stored this one died before publishing it: the next pass of any API sends it
        lost = _submit(store)
        _age(store, lost.id, 60)
        requeued = _submit(store)
        assert lc.claim(store, "ghost", lease_seconds=-1, task_id=requeued.id) == requeued.id
        assert lc.expire_leases(store, 1, requeue_unstarted=True) == {requeued.id: "requeued"}
        _age(store, requeued.id, 60)
        sent = api2.maintain() + api1.maintain()
        assert sorted(sent) == sorted([lost.id, requeued.id])  # each by one process only
        assert _queue_lengths(redis_settings)["sd15"] == 3
        # a message lost with the broker: published again after broker_redeliver_seconds (a clock
        # moved past the last publication instead of a sleep)
        ids = [sd.id, flux.id, lost.id, requeued.id]
        published = [store.get_task(i).dispatched_at for i in ids]
        clock = ManualClock(min(published) + 0.4)
        resend = CeleryExecutor(redis_settings.with_(broker_redeliver_seconds=0.5), clock=clock)
        assert resend.maintain() == []  # no publication is 0.5 s old yet
        clock.advance(max(published) - min(published) + 0.2)
        assert sorted(resend.maintain()) == sorted(ids)
        resend.stop()
        message = json.loads(__import__("redis").Redis.from_url(redis_settings.fleet.broker_url).lindex(
            f"{redis_settings.fleet.queue_prefix}:{redis_settings.fleet.queue_prefix}.flux", 0))
        assert message["headers"]["task"] == "easel.run_task"  # only the id travels
        assert json.loads(__import__("base64").b64decode(message["body"]))[0] == [flux.id]
    finally:
        api1.stop()
        api2.stop()
        store.engine.dispose()


def test_a_publication_that_fails_leaves_the_task_for_the_next_pass(tmp_path):
    from easel.executors.celery import CeleryExecutor

    settings = Settings(data_dir=tmp_path, executor="celery", broker_url="redis://127.0.0.1:1/0")
    store = Store(settings.core.database_url)
    store.migrate()
    executor = CeleryExecutor(settings)
    try:
        task = _submit(store)
        t0 = time.time()
        executor.submit(task.id)  # logged, not raised: the Run was stored and is answered
        assert time.time() - t0 < 30 * TIME_SCALE
        assert store.get_task(task.id).dispatched_at is None
        ok, why = executor.check_broker()
        assert not ok and "redis://127.0.0.1:1/0 is unreachable" in why
    finally:
        executor.stop()
        store.engine.dispose()


# -- easel worker on a real RabbitMQ -------------------------------------------------------------

LEASE = 2 * TIME_SCALE  # short for the kill -9 case; a heartbeat starved on a loaded machine keeps it


def test_a_worker_on_rabbitmq_runs_each_task_once_and_a_killed_one_loses_nothing(tmp_path):
    from easel.executors.celery import TASK_NAME, CeleryExecutor

    url, prefix, cleanup = rabbitmq_broker()
    settings = Settings(data_dir=tmp_path / "api", executor="celery", broker_url=url, queue_prefix=prefix,
                        lease_seconds=LEASE)
    store = Store(settings.core.database_url)
    store.migrate()
    api = CeleryExecutor(settings)
    env = {"EASEL_QUEUE_PREFIX": prefix, "EASEL_LEASE_SECONDS": str(LEASE)}
    metrics_port = free_port()
    first = WorkerProc(tmp_path / "w1", url, settings.core.database_url, env, queues="sd15", name="w1",
                       extra_args=("--metrics-port", str(metrics_port)))
    second = WorkerProc(tmp_path / "w2", url, settings.core.database_url, env, queues="sd15", name="w2")
    project = store.create_project("p")

    def run(params: dict, publish: bool = True) -> Task:
        task = _submit(store, inputs=load_tools()[TOOL].validate(params, ModelCatalog.load()), project=project)
        if publish:
            api.submit(task.id)
        return task

    def wait(task_id: int, statuses=lc.TERMINAL, timeout: float = 120) -> Task:
        deadline = time.time() + timeout * TIME_SCALE
        while time.time() < deadline:
            task = store.get_task(task_id)
            if task.status in statuses:
                return task
            time.sleep(0.1)
        raise AssertionError(f"task {task_id} is {store.get_task(task_id).status}")

    try:
        api.start()
        first.start()
        done = wait(run(SMALL).id)
        assert (done.status, done.pexit) == (lc.POSTPROCESS_END, "0"), done.debugerror
        assert done.worker_id == first.worker_id and len(store.outputs(done.id)) == 1
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert f'easel_tasks_total{{status="succeeded",tool="{TOOL}"}} 1.0' in scraped
        # the same id delivered twice more (a broker's redelivery, a re-publication): nothing runs
        for _ in range(2):
            api.app.send_task(TASK_NAME, args=[done.id], queue=f"{prefix}.sd15", routing_key=f"{prefix}.sd15")
        first.wait_log(rf"task {done.id} skipped by .*\n(.|\n)*task {done.id} skipped by ")
        events = [e.type for e in store.events(done.id)]
        assert events.count(lc.ACCEPT) == events.count(lc.START) == 1 and events.count(lc.POSTPROCESS_END) == 1
        # a task whose worker vanished before it started is queued again by the lease rules and,
        # published again by the next maintenance pass, runs
        ghost = run(SMALL, publish=False)
        assert lc.claim(store, "ghost", lease_seconds=-1, task_id=ghost.id) == ghost.id
        assert lc.expire_leases(store, LEASE, requeue_unstarted=True) == {ghost.id: "requeued"}
        _age(store, ghost.id, 60)
        assert api.maintain() == [ghost.id]
        again = wait(ghost.id)
        assert again.pexit == "0" and again.worker_id == first.worker_id
        assert [e.type for e in store.events(ghost.id)].count(lc.START) == 1
        # kill -9 mid-task: RabbitMQ hands the unacknowledged message to the next worker, which
        # finds the task held (then failed by the lease rules) and runs nothing; the task queued
        # behind it is not lost
        long = run({**SMALL, "steps": 150, "width": 128, "height": 128})
        wait(long.id, (lc.OUTPUT,))
        behind = run(SMALL)
        first.kill9()
        second.start()
        second.wait_log(rf"task {long.id} skipped by ")
        deadline = time.time() + 30 * TIME_SCALE
        while not lc.expire_leases(store, LEASE) and time.time() < deadline:  # an API's maintenance pass
            time.sleep(0.5)
        killed = wait(long.id)
        assert killed.pexit == "1" and "stopped renewing its lease" in killed.debugerror
        assert [e.type for e in store.events(long.id)].count(lc.START) == 1
        saved = wait(behind.id)
        assert saved.pexit == "0" and saved.worker_id == second.worker_id
    finally:
        first.stop()
        second.stop()
        api.stop()
        store.engine.dispose()
        cleanup()


def test_a_worker_per_gpu_is_started_restarted_and_stopped(tmp_path):
    """``easel worker --gpus 0,1``: one process per GPU (its ``--gpus`` last), a dead one restarted,
    SIGTERM passed on to all (with a stand-in for the worker command: no GPU needed)."""
    import os
    import signal

    started = tmp_path / "started.txt"
    stand_in = tmp_path / "worker.py"
    stand_in.write_text("import os, sys, time\nwith open(sys.argv[1], 'a') as f:\n"
                        "    f.write(f'{sys.argv[-1]} {os.getpid()}\\n')\ntime.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, "-c", "import sys; from easel.cli.worker import per_gpu; "
                               f"sys.exit(per_gpu([sys.executable, {str(stand_in)!r}, {str(started)!r}], ('0', '1'), 10.0))"])

    def lines(n: int) -> list[list[str]]:
        deadline = time.time() + 60 * TIME_SCALE
        while time.time() < deadline:
            found = [line.split() for line in started.read_text().splitlines()] if started.exists() else []
            if len(found) >= n:
                return found
            time.sleep(0.1)
        raise AssertionError(f"expected {n} starts: {started.read_text() if started.exists() else ''}")

    try:
        first = dict(lines(2))
        assert set(first) == {"--gpus=0", "--gpus=1"}
        os.kill(int(first["--gpus=1"]), signal.SIGKILL)
        gpu, pid = lines(3)[2]
        assert gpu == "--gpus=1" and pid != first["--gpus=1"]
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(30) == 0
        for child in (first["--gpus=0"], pid):
            with pytest.raises(ProcessLookupError):
                os.kill(int(child), 0)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_fleet_processes_starting_together_migrate_one_postgresql_database():
    """Every ``easel serve`` and ``easel worker`` migrates at start; on one fresh database at once
    they must neither fail nor block each other (an advisory lock orders them)."""
    import threading

    from pg import create_database

    url, drop = create_database()
    errors: list[Exception] = []

    def migrate() -> None:
        store = Store(url)
        try:
            store.migrate()
        except Exception as exc:
            errors.append(exc)
        finally:
            store.engine.dispose()

    threads = [threading.Thread(target=migrate, daemon=True) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60 * TIME_SCALE)
        assert not any(t.is_alive() for t in threads) and errors == []
        probe = Store(url)
        assert probe.create_project("p").id == 1 and probe.get_task(1) is None
        probe.engine.dispose()
    finally:
        drop()  # WITH (FORCE): also ends the sessions of a migration that hung


def test_a_worker_without_its_scratch_folder_fails_the_task_and_holds_nothing(tmp_path):
    """A delivered task whose worker cannot create its scratch folder (the data directory is gone)
    ends as failed, naming why without the server's paths; no heartbeat keeps renewing its lease."""
    import shutil
    import threading

    from easel.tasks.runner import Worker

    settings = Settings(data_dir=tmp_path / "worker", database_url=f"sqlite:///{tmp_path / 'easel.db'}")
    store = Store(settings.core.database_url)
    store.migrate()
    worker = Worker(settings, "w1")
    shutil.rmtree(settings.core.data_dir, ignore_errors=True)
    task = _submit(store)
    assert worker.run_task(task.id)
    ended = store.get_task(task.id)
    assert (ended.status, ended.pexit, ended.lease_expires_at) == (lc.POSTPROCESS_END, "1", None)
    assert "could not create its scratch folder (No such file or directory)" in ended.debugerror
    assert str(tmp_path) not in ended.debugerror
    assert not [t for t in threading.enumerate() if t.name == "easel-heartbeat" and t.is_alive()]
    worker.store.engine.dispose()
    store.engine.dispose()
