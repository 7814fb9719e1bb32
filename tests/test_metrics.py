"""``/metrics`` on a real server of its own (so the numbers are exactly this module's tasks):
bearer-token auth, store-read queue gauges, and the counters and histograms that the worker
process records (multiprocess mode) checked against the tasks the test ran."""
from __future__ import annotations

import http.server
import json
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from conftest import SMALL, TOOL, Server

TOKEN = "scrape-me-7f3a"


@pytest.fixture(scope="module")
def msrv(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("metrics"), env={"EASEL_METRICS_TOKEN": TOKEN}).start()
    yield srv
    srv.stop()


def scrape(srv: Server) -> dict:
    r = httpx.get(f"{srv.base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    """The sample's value; 0 when absent. Labels given must match; others (pid) are summed over."""
    return sum(v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == w for k, w in labels.items()))


class _Hooks(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        self.received.append(self.rfile.read(int(self.headers["content-length"])))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_metrics_require_the_bearer_token_when_set(msrv):
    assert httpx.get(f"{msrv.base}/metrics", timeout=10).status_code == 401
    wrong = httpx.get(f"{msrv.base}/metrics", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert value(scrape(msrv), "easel_http_requests_total", route="/metrics", method="GET", status="401") >= 2


def test_metrics_match_the_tasks_that_ran(msrv):
    project = msrv.project()
    hooks = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    try:
        # an open socket is counted while it is open
        with connect(msrv.base.replace("http", "ws") + "/v1", open_timeout=10):
            deadline = time.time() + 10
            while value(scrape(msrv), "easel_websockets_open") != 1:
                assert time.time() < deadline, "the open WebSocket was not counted"
                time.sleep(0.1)

        callback = f"http://127.0.0.1:{hooks.server_address[1]}/hook"
        ok = [msrv.run(project, {**SMALL, "selectedLoraModel": ["61"], "callbackUrl": callback})["taskid"],
              msrv.run(project, {**SMALL, "seed": "2"})["taskid"]]
        bad = msrv.run(project, {**SMALL, "selectedLoraModelPrivateUrl": "http://10.255.255.1/x.safetensors"})["taskid"]
        done = [msrv.wait(project, t) for t in [*ok, bad]]
        assert [t["pexit"] for t in done] == ["0", "0", "1"], [t["debugerror"] for t in done]

        # a second API process on the same database, without workers (started before the long task)
        other = Server(msrv.data_dir, extra_args=("--workers", "0"), env={"EASEL_METRICS_TOKEN": TOKEN}).start()
        try:
            long = msrv.run(project, {**SMALL, "steps": 150, "width": 128, "height": 128})["taskid"]
            msrv.wait(project, long, until=("task_output",))
            queued = msrv.run(project, SMALL)["taskid"]
            for srv in (msrv, other):  # read from the store at scrape time: the same on every API process
                live = scrape(srv)
                assert value(live, "easel_tasks_running", tool=TOOL) == 1
                assert value(live, "easel_tasks_queued", tool=TOOL) == 1
                assert value(live, "easel_tasks_queued", tool="wiro/text-to-image-flux-lora-fast") == 0
            # each server reports its own process tree: the other one loaded no model and ran no task
            assert value(live, "easel_model_loads_total") == 0 and value(live, "easel_tasks_total") == 0
        finally:
            other.stop()
        assert msrv.post(project, "/v1/Task/Cancel", json={"taskid": queued}).json()["result"]
        assert msrv.post(project, "/v1/Task/Kill", json={"taskid": long}).json()["result"]
        killed = msrv.wait(project, long)
        assert killed["status"] == "task_cancel" and killed["pexit"] == "0" and killed["accepttime"] != "0"

        deadline = time.time() + 30
        while not _Hooks.received:
            assert time.time() < deadline, "the webhook did not arrive"
            time.sleep(0.1)

        deadline = time.time() + 10  # the dispatcher counts right after the receiver answers
        while value(m := scrape(msrv), "easel_webhook_deliveries_total", result="delivered") != 1:
            assert time.time() < deadline
            time.sleep(0.1)
    finally:
        hooks.shutdown()

    for status, n in {"succeeded": 2, "failed": 1, "killed": 1, "cancelled": 1}.items():
        assert value(m, "easel_tasks_total", tool=TOOL, status=status) == n, status
        assert value(m, "easel_task_queue_wait_seconds_count", tool=TOOL, outcome=status) == n, status
    for status, n in {"succeeded": 2, "failed": 1, "killed": 1, "cancelled": 0}.items():
        assert value(m, "easel_task_run_seconds_count", tool=TOOL, outcome=status) == n, status
    # run time = accept -> end, as the store's (whole-second) stage times say, within rounding
    expected = sum(int(t["postprocessendtime"]) - int(t["accepttime"]) for t in done[:2])
    assert abs(value(m, "easel_task_run_seconds_sum", tool=TOOL, outcome="succeeded") - expected) <= 2.0
    assert value(m, "easel_task_run_seconds_bucket", tool=TOOL, outcome="succeeded", le="+Inf") == 2
    assert value(m, "easel_tasks_running", tool=TOOL) == 0 and value(m, "easel_tasks_queued", tool=TOOL) == 0

    # recorded by the worker process (multiprocess mode): one cold load, then the pipeline stayed warm
    assert value(m, "easel_model_loads_total", model="sd15:tiny-sd15") == 1
    assert value(m, "easel_model_load_seconds_count", model="sd15:tiny-sd15") == 1
    assert value(m, "easel_model_load_seconds_sum", model="sd15:tiny-sd15") > 0
    assert value(m, "easel_lora_loads_total") == 1
    assert value(m, "easel_lora_hotswaps_total") == 0
    cache = {dict(ls)["worker"]: v for (n, ls), v in m.items() if n == "easel_pipeline_cache_bytes"}
    assert len(cache) == 1 and list(cache)[0].startswith("local-") and list(cache.values())[0] > 1000

    assert value(m, "easel_webhook_deliveries_total", result="delivered") == 1
    assert json.loads(_Hooks.received[0])["id"] == ok[0]
    assert value(m, "easel_websockets_open") == 0
    assert value(m, "easel_http_requests_total", route="/v1/Run/{owner}/{slug}", method="POST", status="200") == 5
    assert value(m, "easel_http_request_duration_seconds_count", route="/v1/Task/Detail", method="POST") > 0


def test_each_server_gets_its_own_metrics_folder_and_dead_ones_are_swept(tmp_path, monkeypatch):
    import os
    import socket
    import subprocess
    import sys

    from easel.cli.serve import prepare_metrics_dir
    from easel.metrics import outcome

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    host = socket.gethostname()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "metrics" / f"{host}-{gone.stdout.strip()}"  # a server that exited
    alive = tmp_path / "metrics" / f"{host}-{os.getppid()}"  # a running one sharing the data dir
    other_host = tmp_path / "metrics" / "elsewhere-1"
    for d in (stale, alive, other_host):
        d.mkdir(parents=True)
        (d / "counter_1.db").write_bytes(b"x")
    folder = prepare_metrics_dir(tmp_path)
    assert folder == tmp_path / "metrics" / f"{host}-{os.getpid()}" and list(folder.iterdir()) == []
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(folder)
    assert not stale.exists() and alive.exists() and other_host.exists()
    assert prepare_metrics_dir(tmp_path) is None  # an operator's (or an earlier) setting is kept
    assert [outcome("task_postprocess_end", "0", True), outcome("task_postprocess_end", "1", True),
            outcome("task_cancel", "-1", True), outcome("task_cancel", None, False)] == \
        ["succeeded", "failed", "killed", "cancelled"]


def test_a_failing_metric_never_fails_the_caller(monkeypatch, caplog):
    from types import SimpleNamespace

    from easel import metrics

    def broken(*_a, **_k):
        raise OSError("metrics folder removed")

    monkeypatch.setattr(metrics.TASKS, "labels", broken)
    monkeypatch.setattr(metrics.HTTP_REQUESTS, "labels", broken)
    task = SimpleNamespace(tool=TOOL, status="task_postprocess_end", pexit="0", createtime=1.0, accepttime=2.0,
                           canceltime=None, endtime=3.0, postprocessendtime=3.5)
    metrics.task_ended(task)
    metrics.http_request("/x", "GET", 200, 0.1)
    with metrics.websocket_open():
        pass
    assert "could not record a metric in task_ended" in caplog.text
