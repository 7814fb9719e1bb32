"""A full disk (issue 21, item 7): the API answers Wiro's error envelope with HTTP 507 instead of a
500 or a reset, ``/healthz`` says why it is unhealthy, no accepted task is lost, a task whose
outputs cannot be written fails with that reason, and once space returns everything runs.

For real on a small tmpfs this test mounts as the data directory (root only; elsewhere skipped,
failed in CI), and in-process on SQLite's own ``database or disk is full`` (``SQLITE_FULL``, from
``PRAGMA max_page_count``), which needs no mount."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import event

import services
from conftest import SMALL, TIME_SCALE, TOOL, Server
from easel.config import Settings
from easel.signing import signature

BIG = {**SMALL, "prompt": "a red fish " * 60}  # a few pages of the database per task


def _wiro_disk_full(r: httpx.Response) -> None:
    assert r.status_code == 507, r.text
    assert r.json() == {"result": False, "errors": [{"code": 0, "message": "The server's disk is full: the request "
                                                                          "was not stored. Try again later."}]}
    assert r.headers["retry-after"] == "30"


def test_sqlite_full_answers_507_and_healthz_says_why(tmp_path):
    from fastapi.testclient import TestClient

    from easel.api import create_app

    settings = Settings(data_dir=tmp_path)
    app = create_app(settings)
    api = app.state.api
    api.store.migrate()
    project = api.store.create_project("p")
    full = {"on": False}

    @event.listens_for(api.store.engine, "connect")
    def _limit(dbapi_conn, _record):  # the database may not grow: SQLite's "database or disk is full"
        if full["on"]:
            pages = dbapi_conn.execute("PRAGMA page_count").fetchone()[0]
            dbapi_conn.execute(f"PRAGMA max_page_count = {pages}")

    def run(client):
        nonce = str(time.time_ns())
        return client.post(f"/v1/Run/{TOOL}", json=BIG, headers={
            "x-api-key": project.apikey, "x-nonce": nonce, "x-signature": signature(project.apikey, project.apisecret, nonce)})

    with TestClient(app) as client:
        accepted = run(client).json()["taskid"]
        full["on"] = True
        api.store.engine.dispose()
        answers = [run(client) for _ in range(8)]  # the free room of the database's last pages runs out
        assert {r.status_code for r in answers} == {200, 507} or {r.status_code for r in answers} == {507}
        for r in answers:
            if r.status_code == 507:
                _wiro_disk_full(r)
        health = client.get("/healthz")
        assert health.status_code == 503 and health.json()["ok"] is False
        assert "a write failed for lack of disk space" in health.json()["reason"]
        full["on"] = False
        api.store.engine.dispose()
        assert run(client).json()["result"] is True  # space is back: Runs are stored again
        assert api.store.get_task(int(accepted)) is not None  # nothing accepted was lost


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MB tmpfs mounted for this test (removed afterwards)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        reason = f"cannot mount a tmpfs here (needs root): {(r.stderr or r.stdout).strip()}"
        if services.in_ci():
            pytest.fail(f"CI=true: {reason}", pytrace=False)
        pytest.skip(reason)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(folder: Path) -> Path:
    """Write a file into ``folder`` until its disk is full; returns it (unlink it to free the space)."""
    path = folder / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return path


METRICS = """
import sys
from easel import metrics
print("ready", flush=True)
sys.stdin.readline()  # the disk is full now
for i in range(20000):  # new label values: the metric files must grow
    metrics.webhook_attempt(f"result-{i}")
print("alive")
"""


def test_metrics_files_on_a_full_disk_do_not_kill_the_process(small_disk):
    """prometheus_client grows its memory-mapped files with holes: a sample written into one on a
    full disk was a SIGBUS (the server and its workers died with nothing in the log)."""
    folder = small_disk / "metrics"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", METRICS], env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        filler = _fill(small_disk)
        try:
            out, err = proc.communicate("go\n", timeout=120)
        finally:
            filler.unlink()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0 and "alive" in out, (proc.returncode, err[-2000:])  # SIGBUS was -7
    assert "could not record a metric" in err  # the failure is logged, not fatal


def test_a_full_data_disk_refuses_runs_with_507_loses_nothing_and_recovers(small_disk, tiny, tmp_path):
    data = small_disk / "data"
    (data / "models").mkdir(parents=True)
    (data / "models" / "tiny").symlink_to(next(iter(tiny.values())).parent)  # the session's tiny models
    (data / "server.log").symlink_to(tmp_path / "server.log")  # the log must outlive the full disk
    server = Server(data).start()
    try:
        project = server.project()
        first = server.run(project, SMALL)["taskid"]
        assert server.wait(project, first)["pexit"] == "0"
        filler = _fill(small_disk)
        accepted, refused = [], 0
        try:
            for _ in range(12):
                r = server.post(project, f"/v1/Run/{TOOL}", json=BIG)  # a reset or a dead server raises here
                if r.status_code == 200:
                    accepted.append(r.json()["taskid"])
                else:
                    _wiro_disk_full(r)
                    refused += 1
            assert refused > 0
            health = httpx.get(f"{server.base}/healthz", timeout=30)
            assert health.status_code == 503 and "disk is full" in health.json()["reason"], health.text
            time.sleep(2)
            assert server.proc.poll() is None  # the server is alive
        finally:
            filler.unlink()
        deadline = time.monotonic() + 60 * TIME_SCALE
        while httpx.get(f"{server.base}/healthz", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "healthz did not recover"
            time.sleep(0.5)
        for taskid in accepted:  # every accepted task ran or failed with the reason, none is lost
            task = server.wait(project, taskid)
            assert task["status"] == "task_postprocess_end", task
            assert task["pexit"] == "0" or "The server's disk is full" in task["debugerror"], task
        last = server.run(project, SMALL)["taskid"]  # and new work runs
        assert server.wait(project, last)["pexit"] == "0"
        assert server.proc.poll() is None
    finally:
        server.stop()
