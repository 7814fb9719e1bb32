"""Issue 3 through real servers: WebSocket events (also from another API process), previews,
webhooks, Tool/List and Tool/Detail, InputOutputDelete, Idempotency-Key, Prefer: wait, limits,
OpenAPI, the Python client (sync and async) and the `easel tasks` CLI."""
from __future__ import annotations

import asyncio
import base64
import http.server
import io
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from websockets.sync.client import connect

from conftest import SMALL, TOOL, Server

STAGES = ["task_queue", "task_accept", "task_preprocess_start", "task_preprocess_end", "task_assign", "task_start"]
ENDING = ["task_output_full", "task_end", "task_postprocess_start", "task_postprocess_end"]  # + task_error_full if stderr


def ws_frames(server, token: str, previews: bool = False, register: dict | None = None) -> list[dict]:
    url = server.base.replace("http", "ws") + "/v1" + ("?previews=1" if previews else "")
    frames = []
    with connect(url, open_timeout=10) as ws:
        ws.send(json.dumps(register or {"type": "task_info", "tasktoken": token}))
        while True:
            frame = json.loads(ws.recv(timeout=120))
            frames.append(frame)
            if frame["type"] in ("task_postprocess_end", "task_cancel") or frame.get("result") is False:
                return frames


def check_sequence(frames: list[dict], steps: int, taskid: str, token: str) -> None:
    all_types = [f["type"] for f in frames]
    # interim stderr lines (library warnings) may come any time; their total follows task_output_full
    types = [t for t in all_types if t != "task_error"]
    stderr = "task_error" in all_types
    ending = ENDING[:1] + ["task_error_full"] * stderr + ENDING[1:]
    assert types == STAGES + ["task_output"] * steps + ending, all_types
    if stderr:
        assert all(i < all_types.index("task_error_full") for i, t in enumerate(all_types) if t == "task_error")
    frames = [f for f in frames if f["type"] != "task_error"]
    assert all(f["id"] == taskid and f["tasktoken"] == token and f["result"] is True for f in frames)
    assert all(f["message"] is None for f in frames if f["type"] in STAGES + ["task_end", "task_postprocess_start"])
    percents = [float(f["message"]["percentage"]) for f in frames if f["type"] == "task_output"]
    assert percents == sorted(percents) and percents[-1] == 100
    info = frames[STAGES.__len__()]["message"]  # Wiro's flat progressGenerate object
    assert set(info) == {"type", "task", "percentage", "stepCurrent", "stepTotal", "speed", "speedType", "elapsedTime",
                         "remainingTime"} and info["speedType"] == "it/s" and info["type"] == "progressGenerate"
    assert isinstance(frames[-len(ending)]["message"]["raw"], str)  # task_output_full
    outputs = frames[-1]["message"]
    assert outputs and outputs[0]["url"].startswith("http") and outputs[0]["name"] == "0.png"


def test_websocket_sees_the_ordered_sequence_live_and_late(server, project):
    answer = server.run(project, {**SMALL, "steps": 6})
    live = ws_frames(server, answer["socketaccesstoken"])
    check_sequence(live, 6, answer["taskid"], answer["socketaccesstoken"])
    late = ws_frames(server, answer["socketaccesstoken"])  # registers after the end: replays everything
    assert [f["type"] for f in late] == [f["type"] for f in live]


def test_websocket_on_another_api_process(server, project):
    other = Server(server.data_dir, extra_args=("--workers", "0")).start()  # API only, same store
    try:
        answer = other.run(project, {**SMALL, "steps": 4})  # the worker of `server` runs it
        check_sequence(ws_frames(other, answer["socketaccesstoken"]), 4, answer["taskid"], answer["socketaccesstoken"])
    finally:
        other.stop()


def test_previews_are_jpegs_only_when_asked(server, project):
    answer = server.run(project, {**SMALL, "steps": 10, "width": 128, "height": 128})
    with_previews = ws_frames(server, answer["socketaccesstoken"], previews=True)
    shots = [f for f in with_previews if "preview" in f]
    assert [int(f["message"]["stepCurrent"]) for f in shots] == [5, 10]
    for f in shots:
        image = Image.open(io.BytesIO(base64.b64decode(f["preview"])))
        assert image.format == "JPEG" and image.size == (16, 16) and f["previewType"] == "image/jpeg"
    assert not any("preview" in f for f in ws_frames(server, answer["socketaccesstoken"]))
    registered = ws_frames(server, "", register={"type": "task_info", "tasktoken": answer["socketaccesstoken"],
                                                 "previews": True})
    assert sum("preview" in f for f in registered) == 2


def test_websocket_unknown_token_is_an_error_frame(server):
    frames = ws_frames(server, "nope")
    assert frames == [{"type": "error", "result": False, "tasktoken": "nope",
                       "message": "There is no task with this tasktoken."}]


# -- webhooks -------------------------------------------------------------------------------------


class Receiver:
    """A loopback webhook receiver: paths under /flaky/ fail their first two attempts, /down/ always fails."""

    def __init__(self):
        self.requests: list[tuple[str, dict, bytes]] = []
        self.tries: dict[str, int] = {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.requests.append((self.path, dict(self.headers), body))
                outer.tries[self.path] = outer.tries.get(self.path, 0) + 1
                ok = self.path.startswith("/flaky/") and outer.tries[self.path] > 2
                self.send_response(200 if ok else 500)
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def on(self, path: str) -> list[tuple[str, dict, bytes]]:
        return [r for r in self.requests if r[0] == path]


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.httpd.shutdown()


def docs_verify():
    """The verification snippet of docs/webhooks.md, executed as written."""
    text = (Path(__file__).parent.parent / "docs" / "webhooks.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(code, namespace)
    return namespace["verify"]


def wait_until(predicate, timeout: float = 30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached")


def test_webhook_is_delivered_once_verified_after_two_failures(server, project, receiver, queue_server):
    from easel.client import verify_webhook

    verify = docs_verify()
    done = server.run(project, {**SMALL, "callbackUrl": f"{receiver.url}/flaky/done"})
    task = server.wait(project, done["taskid"])
    wait_until(lambda: len(receiver.on("/flaky/done")) == 3)
    qproject = queue_server.project()
    queued = queue_server.run(qproject, {**SMALL, "callbackUrl": f"{receiver.url}/flaky/cancel"})
    assert queue_server.post(qproject, "/v1/Task/Cancel", json={"taskid": queued["taskid"]}).json()["result"]
    wait_until(lambda: len(receiver.on("/flaky/cancel")) == 3)
    time.sleep(1.0)  # nothing more may arrive once delivered
    for path, secret, expect in (("/flaky/done", project.apisecret, task),
                                 ("/flaky/cancel", qproject.apisecret, None)):
        attempts = receiver.on(path)
        assert len(attempts) == 3
        ids = {verify(secret, h, body) for _, h, body in attempts}
        assert len(ids) == 1 and ids == {verify_webhook(secret, attempts[-1][1], attempts[-1][2])}
        assert len({body for _, _, body in attempts}) == 1
        payload = json.loads(attempts[-1][2])
        if expect is not None:
            assert payload["id"] == expect["id"] and payload["status"] == "task_postprocess_end"
            assert payload["pexit"] == "0" and payload["outputs"][0]["url"] == expect["outputs"][0]["url"]
        else:
            assert payload["status"] == "task_cancel"
    _, headers, body = receiver.on("/flaky/done")[0]
    with pytest.raises(ValueError):
        verify("wrong-secret", headers, body)
    with pytest.raises(ValueError):
        verify(project.apisecret, headers, body + b" ")


def test_no_webhook_after_the_task_was_deleted(server, project, receiver):
    answer = server.run(project, {**SMALL, "callbackUrl": f"{receiver.url}/down/deleted"})
    server.wait(project, answer["taskid"])
    wait_until(lambda: len(receiver.on("/down/deleted")) >= 1)
    r = server.post(project, "/v1/Task/InputOutputDelete", json={"tasktoken": answer["socketaccesstoken"]})
    assert r.json() == {"result": True, "errors": []}
    time.sleep(0.5)  # an attempt already in flight may still land
    seen = len(receiver.on("/down/deleted"))
    time.sleep(2.0)  # backoff 0.2 s doubling: several attempts would have come
    assert len(receiver.on("/down/deleted")) == seen
    assert [d.status for d in server.store.deliveries(int(answer["taskid"]))] == ["dropped"]


def test_webhook_to_a_private_address_is_refused(tmp_path):
    from easel.api.webhooks import WebhookDispatcher
    from easel.config import Settings
    from easel.store import Store
    from easel.tasks import lifecycle as lc

    settings = Settings(data_dir=tmp_path)  # no --fetch-allow: loopback is not public
    store = Store(settings.core.database_url)
    store.migrate()
    p = store.create_project("x")
    task, _ = lc.submit(store, project_id=p.id, tool=TOOL, parameters={}, inputs={},
                        callbackurl="http://127.0.0.1:9/hook", cost_per_second=0)
    assert lc.cancel(store, task.id)
    WebhookDispatcher(settings, store, lambda tid: {"id": str(tid)}).run_once()
    (delivery,) = store.deliveries(task.id)
    assert delivery.status == "failed" and "non-public address" in delivery.last_error


# -- the rest of the API --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def queue_server(tmp_path_factory):
    """A server without workers (tasks stay queued), a concurrency limit of 1 and 8 requests/minute."""
    srv = Server(tmp_path_factory.mktemp("queue"), extra_args=("--workers", "0"),
                 env={"EASEL_MAX_CONCURRENT_TASKS": "1", "EASEL_RATE_LIMIT_PER_MINUTE": "8"}).start()
    yield srv
    srv.stop()


def test_concurrency_limit_answers_code_96(queue_server):
    p = queue_server.project()
    first = queue_server.run(p, SMALL)
    body = queue_server.post(p, f"/v1/Run/{TOOL}", json=SMALL).json()
    assert body["result"] is False and body["errors"][0]["code"] == 96
    assert body["errors"][0]["message"] == "You have reached your concurrent task limit."
    assert "up to 1 unfinished" in body["errors"][0]["detail"]
    queue_server.post(p, "/v1/Task/Cancel", json={"taskid": first["taskid"]})
    assert queue_server.run(p, SMALL)["result"]  # a finished task frees its slot


def test_rate_limit_answers_429_with_retry_after(queue_server):
    p = queue_server.project()
    answers = [queue_server.post(p, "/v1/Tool/List", json={}) for _ in range(9)]
    assert [a.status_code for a in answers] == [200] * 8 + [429]
    last = answers[-1]
    assert last.json()["errors"][0]["code"] == 0 and "8 requests per minute" in last.json()["errors"][0]["message"]
    assert 1 <= int(last.headers["retry-after"]) <= 60


def test_queue_position_and_eta(queue_server):
    a, b = queue_server.project(), queue_server.project()
    first = queue_server.run(a, SMALL)
    second = queue_server.run(b, SMALL)
    d1, d2 = queue_server.detail(a, first["taskid"]), queue_server.detail(b, second["taskid"])
    assert int(d2["queueposition"]) == int(d1["queueposition"]) + 1 and d1["eta"] == ""
    queue_server.post(a, "/v1/Task/Cancel", json={"taskid": first["taskid"]})
    assert int(queue_server.detail(b, second["taskid"])["queueposition"]) == int(d2["queueposition"]) - 1
    assert queue_server.detail(a, first["taskid"])["queueposition"] == ""


def test_idempotency_key_returns_the_first_task(server, project):
    key = f"retry-{time.time()}"
    first = server.run(project, SMALL, headers={"Idempotency-Key": key})
    again = server.run(project, {**SMALL, "prompt": "something else"}, headers={"Idempotency-Key": key})
    other = server.run(project, SMALL, headers={"Idempotency-Key": key + "-2"})
    assert again["taskid"] == first["taskid"] and again["socketaccesstoken"] == first["socketaccesstoken"]
    assert other["taskid"] != first["taskid"]
    assert server.detail(project, first["taskid"])["parameters"]["prompt"] == SMALL["prompt"]


def test_prefer_wait_returns_the_finished_task(server, project):
    r = server.post(project, f"/v1/Run/{TOOL}", json=SMALL, headers={"Prefer": "wait=60"})
    body = r.json()
    assert r.headers["preference-applied"] == "wait=60"
    task = body["tasklist"][0]
    assert body["taskid"] == task["id"] and task["status"] == "task_postprocess_end" and task["pexit"] == "0"
    assert task["outputs"][0]["url"].startswith("http://")
    assert httpx.get(task["outputs"][0]["url"]).status_code == 200


def test_tool_list_filters_and_detail(server, project):
    def tools(**body):
        r = server.post(project, "/v1/Tool/List", json=body).json()
        return r["total"], [f"{t['slugowner']}/{t['slugproject']}" for t in r["tool"]]

    total, names = tools()
    assert total == 5 and len(names) == 5
    assert tools(categories=["lora-flux"]) == (2, ["Adel_AI/Comics-Factory-v1", "wiro/text-to-image-flux-lora-fast"])
    assert tools(categories=["lora-flux", "tool"]) == (1, ["wiro/text-to-image-flux-lora-fast"])
    assert tools(search="COMICS") == (1, ["Adel_AI/Comics-Factory-v1"])
    assert tools(start="1", limit="2")[1] == names[1:3]
    detail = server.post(project, "/v1/Tool/Detail", json={"slugowner": "wiro", "slugproject": "text-to-image-sd-lora"}).json()
    items = {i["id"]: i for i in detail["tool"][0]["parameters"][0]["items"]}
    assert items["prompt"]["required"] is True and items["steps"]["type"] == "number"
    assert items["steps"]["default"] == 30 and items["steps"]["max"] == 150
    assert {"value": "EulerDiscreteScheduler", "label": "EulerDiscreteScheduler"} in items["scheduler"]["options"]
    missing = server.post(project, "/v1/Tool/Detail", json={"slugowner": "x", "slugproject": "y"}).json()
    assert missing["errors"][0] == {"code": 1, "message": "slug-owner-project-not-exist"}


def test_input_output_delete_removes_files_and_keeps_the_record(server, project, queue_server):
    task = server.wait(project, server.run(project, SMALL)["taskid"])
    url = task["outputs"][0]["url"]
    assert httpx.get(url).status_code == 200
    for _ in range(2):  # idempotent
        r = server.post(project, "/v1/Task/InputOutputDelete", json={"taskid": task["id"]})
        assert r.json() == {"result": True, "errors": []}
    assert httpx.get(url).status_code == 404
    after = server.detail(project, task["id"])
    assert after["status"] == "task_postprocess_end" and after["pexit"] == "0" and after["outputs"] == []
    assert after["parameters"]["prompt"] == SMALL["prompt"]
    p = queue_server.project()
    queued = queue_server.run(p, SMALL)
    body = queue_server.post(p, "/v1/Task/InputOutputDelete", json={"taskid": queued["taskid"]}).json()
    assert body["result"] is False and body["errors"][0] == {
        "code": 1, "message": "Task must be completed or cancelled before deleting files", "detail": "The task is task_queue."}


def test_openapi_describes_each_tool_run(server):
    doc = httpx.get(f"{server.base}/openapi.json").json()
    for path in ("/v1/Task/Detail", "/v1/Task/InputOutputDelete", "/v1/Tool/List", "/v1/Tool/Detail"):
        assert path in doc["paths"]
    ids = [op["operationId"] for item in doc["paths"].values() for op in item.values() if "operationId" in op]
    assert len(ids) == len(set(ids)), sorted(ids)  # code generators (openapi-generator) refuse duplicates
    assert set(doc["paths"]["/v1/File/{accesskey}/{name}"]) == {"get", "head"}
    schema = doc["paths"]["/v1/Run/wiro/text-to-image-sd-lora"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    props = schema["properties"]
    assert "DPMSolverMultistepScheduler" in props["scheduler"]["enum"] and props["scheduler"]["default"] == "EulerDiscreteScheduler"
    assert props["steps"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 150}
    flux = doc["paths"]["/v1/Run/wiro/text-to-image-flux-lora-fast"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert flux["properties"]["width"]["anyOf"][0]["multipleOf"] == 16
    assert flux["properties"]["flux-RealismLora"]["maximum"] == 1.0


# -- client and CLI -------------------------------------------------------------------------------


def test_client_run_wait_follows_the_websocket(server, project):
    from easel.client import AsyncClient, Client

    client = Client(f"{server.base}/v1", project.apikey, project.apisecret)
    frames: list[dict] = []
    task = client.run(TOOL, {**SMALL, "steps": 3}, wait=True, on_event=frames.append)
    assert task["status"] == "task_postprocess_end" and task["pexit"] == "0"
    kinds = [f["type"] for f in frames if f["type"] != "task_error"]
    assert kinds[-1] == "task_postprocess_end" and len(kinds) == len(STAGES) + 3 + len(ENDING)
    polling = Client(f"{server.base}/v1", project.apikey, project.apisecret, socket_url="ws://127.0.0.1:9/v1")
    assert polling.run(TOOL, SMALL, wait=True)["pexit"] == "0"  # no socket there: falls back to polling

    async def go():
        aclient = AsyncClient(f"{server.base}/v1", project.apikey, project.apisecret)
        seen: list[dict] = []
        try:
            return await aclient.run(TOOL, SMALL, wait=True, on_event=seen.append), seen
        finally:
            await aclient.aclose()

    atask, seen = asyncio.run(go())
    assert atask["pexit"] == "0" and seen[-1]["type"] == "task_postprocess_end"


def test_cli_tasks_list_detail_delete(server, project):
    task = server.wait(project, server.run(project, SMALL)["taskid"])
    env = {"EASEL_BASE_URL": f"{server.base}/v1", "EASEL_API_KEY": project.apikey,
           "EASEL_API_SECRET": project.apisecret, "COLUMNS": "200", "PATH": "/usr/bin:/bin"}

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "easel", "tasks", *args], capture_output=True, text=True, env=env,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert re.search(rf"\b{task['id']}\b.*task_postprocess_end", cli("list", "--limit", "50"))
    env["COLUMNS"] = "40"  # piped: whole values, tab-separated, whatever the width
    rows = [line.split("\t") for line in cli("list", "--limit", "50").splitlines()]
    assert rows[0] == ["id", "tool", "status", "pexit", "created", "outputs"]
    assert [task["id"], "wiro/text-to-image-sd-lora", "task_postprocess_end", "0"] in [r[:4] for r in rows]
    listed = json.loads(cli("list", "--limit", "50", "--json"))
    assert task["id"] in [t["id"] for t in listed] and all("outputs" in t for t in listed)
    assert json.loads(cli("detail", task["id"]))["id"] == task["id"]
    assert "deleted" in cli("delete", task["id"])
    assert server.detail(project, task["id"])["outputs"] == []


def test_pending_webhooks_survive_a_restart(tmp_path, receiver):
    from easel.tasks import lifecycle as lc

    srv = Server(tmp_path, extra_args=("--workers", "0"))  # not started: the "stopped" server's store
    p = srv.project()
    task, _ = lc.submit(srv.store, project_id=p.id, tool=TOOL, parameters={}, inputs={},
                        callbackurl=f"{receiver.url}/flaky/restart", cost_per_second=0)
    assert lc.cancel(srv.store, task.id)  # terminal while no server runs: the delivery waits in the store
    assert [d.status for d in srv.store.deliveries(task.id)] == ["pending"]
    srv.start()
    try:
        wait_until(lambda: [d.status for d in srv.store.deliveries(task.id)] == ["delivered"])
        assert len(receiver.on("/flaky/restart")) == 3
    finally:
        srv.stop()
