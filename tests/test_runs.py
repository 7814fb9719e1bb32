"""Seed-style requests through the real server and worker: outputs, determinism, LoRAs, lifecycle."""
from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from conftest import SMALL, TOOL, Server, pixels, png_size

SEED_CURL_BODY = {
    "selectedModel": "", "selectedModelPrivate": "", "selectedLoraModel": [], "selectedLoraModelPrivateUrl": "",
    "prompt": "summer landscape, red color, Bokeh, the waterfall, fog over the lake, insanely detailed and intricate, "
              "hypermaximalist, elegant, ornate, hyper realistic, super detailed.",
    "negativePrompt": "", "samples": 4, "steps": 30, "scale": "7.5", "seed": "123456", "clipSkip": 4,
    "width": 512, "height": 512, "scheduler": "EulerDiscreteScheduler",
    "callbackUrl": "You can provide a callback URL; Wiro will send a POST request to it when the task is completed.",
}


def test_seed_curl_body_under_multipart_content_type(server, project):
    """The seed's curl: Content-Type multipart/form-data with a JSON body, 512² × 4 × 30 steps."""
    r = server.post(project, "/v1/Run/wiro/text-to-image-sd-lora",
                    headers={"Content-Type": "multipart/form-data"}, content=json.dumps(SEED_CURL_BODY))
    answer = r.json()
    assert answer["result"] is True and answer["errors"] == [] and answer["taskid"].isdigit()
    assert len(answer["socketaccesstoken"]) == 30
    task = server.wait(project, answer["taskid"])
    assert task["pexit"] == "0", task["debugerror"]
    assert [o["name"] for o in task["outputs"]] == ["0.png", "1.png", "2.png", "3.png"]
    assert all(png_size(b) == (512, 512) for b in server.images(task))
    assert task["callbackurl"] == ""  # a sentence is not a URL: recorded as none, Run not failed
    assert "seed=123456" in task["debugoutput"]
    # the Wiro task shape: every documented field, as strings
    for key in ("id", "uuid", "socketaccesstoken", "status", "pexit", "debugoutput", "debugerror", "createtime",
                "accepttime", "preprocessstarttime", "preprocessendtime", "assigntime", "starttime", "endtime",
                "canceltime", "postprocessstarttime", "postprocessendtime", "elapsedseconds", "cps", "totalcost",
                "modelslugowner", "modelslugproject", "modeldescription", "categories"):
        assert isinstance(task[key], str), key
    assert float(task["totalcost"]) > 0 and task["modelslugproject"] == "text-to-image-sd-lora"
    assert task["modeldescription"].startswith("A text-to-image tool")
    out = task["outputs"][0]
    assert out["contenttype"] == "image/png" and int(out["size"]) > 0 and out["accesskey"]
    stamps = [int(task[k]) for k in ("createtime", "accepttime", "preprocessstarttime", "preprocessendtime",
                                     "assigntime", "starttime", "endtime", "postprocessstarttime", "postprocessendtime")]
    assert stamps == sorted(stamps)


def test_json_and_form_requests_with_string_numbers(server, project):
    json_task = server.run(project, {**SMALL, "samples": "2", "scale": "2.0", "steps": "3.0", "width": "64"})
    form = {k: str(v) for k, v in SMALL.items() if k != "selectedLoraModel"}
    r = server.post(project, f"/v1/Run/{TOOL}", data={**form, "samples": "2", "selectedLoraModel": ""})
    form_task = r.json()
    for answer in (json_task, form_task):
        task = server.wait(project, answer["taskid"])
        assert task["pexit"] == "0", task["debugerror"]
        assert [png_size(b) for b in server.images(task)] == [(64, 64), (64, 64)]


def test_same_seed_same_bytes_different_seed_differs(server, project):
    a = server.wait(project, server.run(project, SMALL)["taskid"])
    b = server.wait(project, server.run(project, SMALL)["taskid"])
    c = server.wait(project, server.run(project, {**SMALL, "seed": "43"})["taskid"])
    assert server.images(a) == server.images(b)
    assert server.images(a) != server.images(c)


def test_empty_seed_gets_a_random_recorded_seed(server, project):
    task = server.wait(project, server.run(project, {**SMALL, "seed": ""})["taskid"])
    assert task["pexit"] == "0"
    assert "seed=" in task["debugoutput"] and task["debugoutput"].split("seed=")[1].strip().isdigit()


def test_lora_scales_change_output_and_zero_scale_equals_none(server, project):
    base = server.images(server.wait(project, server.run(project, SMALL)["taskid"]))
    runs = {}
    for scale in ("0", "0.3", "1"):
        task = server.wait(project, server.run(project, {**SMALL, "selectedLoraModel": ["61"],
                                                         "Fish-out-of-Water-v1.0": scale})["taskid"])
        assert task["pexit"] == "0", task["debugerror"]
        runs[scale] = server.images(task)
    assert pixels(runs["0"]) == pixels(base)
    assert pixels(runs["0.3"]) != pixels(base) and pixels(runs["1"]) != pixels(runs["0.3"])


def test_several_loras_at_once_from_comma_separated_multiselect(server, project):
    task = server.wait(project, server.run(project, {**SMALL, "selectedLoraModel": "61,62",
                                                     "Emotion-Happy-Slider-v1.0": "-2"})["taskid"])
    assert task["pexit"] == "0", task["debugerror"]


def test_lora_from_url_on_local_server(server, project, file_server):
    base_url, _ = file_server
    base = server.images(server.wait(project, server.run(project, SMALL)["taskid"]))
    for name in ("sd15-lora-kohya", "sd15-lora-peft"):
        task = server.wait(project, server.run(project, {
            **SMALL, "selectedLoraModelPrivateUrl": f"{base_url}/{name}.safetensors"})["taskid"])
        assert task["pexit"] == "0", task["debugerror"]
        assert pixels(server.images(task)) != pixels(base)


def test_multipart_upload_of_a_lora_file(server, project, tiny):
    base = server.images(server.wait(project, server.run(project, SMALL)["taskid"]))
    fields = {k: str(v) for k, v in SMALL.items() if k != "selectedLoraModel"}
    with open(tiny["sd15-lora-kohya"], "rb") as fh:
        r = server.post(project, f"/v1/Run/{TOOL}", data=fields,
                        files={"selectedLoraModelPrivateUrl": ("mine.safetensors", fh, "application/octet-stream")})
    answer = r.json()
    assert answer["result"], answer
    task = server.wait(project, answer["taskid"])
    assert task["pexit"] == "0", task["debugerror"]
    shown = task["parameters"]["selectedLoraModelPrivateUrl"]  # a file URL, as the seed's Kill answer shows
    assert shown.startswith(f"{server.base}/v1/File/") and shown.endswith("mine.safetensors"), shown
    with open(tiny["sd15-lora-kohya"], "rb") as fh:
        assert httpx.get(shown).content == fh.read()
        assert httpx.head(shown).status_code == 200
    assert pixels(server.images(task)) != pixels(base)
    server.post(project, "/v1/Task/InputOutputDelete", json={"taskid": task["id"]})
    assert httpx.get(shown).status_code == 404


def test_tool_error_then_worker_keeps_serving(server, project, file_server):
    base_url, _ = file_server
    bad = server.wait(project, server.run(project, {
        **SMALL, "selectedLoraModelPrivateUrl": f"{base_url}/evil.safetensors"})["taskid"])
    assert bad["status"] == "task_postprocess_end" and bad["pexit"] == "1"
    assert "pickle" in bad["debugerror"] and bad["totalcost"] == "0" and bad["outputs"] == []
    good = server.wait(project, server.run(project, SMALL)["taskid"])
    assert good["pexit"] == "0"


def test_redirect_to_unallowed_loopback_address_is_refused(server, project, file_server):
    base_url, _ = file_server
    port = base_url.rsplit(":", 1)[1]
    # 127.0.0.1 is allow-listed for the tests; 127.0.0.2 (also loopback) is not
    task = server.wait(project, server.run(project, {
        **SMALL, "selectedLoraModelPrivateUrl": f"http://127.0.0.2:{port}/sd15-lora-kohya.safetensors"})["taskid"])
    assert task["pexit"] == "1" and "non-public address" in task["debugerror"]


def test_cancel_queued_and_kill_running(server, project):
    long = {**SMALL, "steps": 150, "width": 256, "height": 256, "samples": 2}
    running = server.run(project, long)["taskid"]
    queued = server.run(project, SMALL)["taskid"]
    server.wait(project, running, until=("task_output",))
    r = server.post(project, "/v1/Task/Cancel", json={"taskid": queued}).json()
    assert r["result"] and r["tasklist"][0]["status"] == "task_cancel"
    # a running task cannot be cancelled, only killed
    r = server.post(project, "/v1/Task/Cancel", json={"taskid": running}).json()
    assert r == {"result": False, "errors": [{"code": 1, "message": "Task is not in a cancellable state."}]}
    before = int(server.detail(project, running)["progress"]["stepCurrent"])
    token = server.detail(project, running)["socketaccesstoken"]
    r = server.post(project, "/v1/Task/Kill", json={"socketaccesstoken": token}).json()
    assert r["result"], r
    task = server.wait(project, running)
    assert task["status"] == "task_cancel" and task["outputs"] == []
    after = int(task["progress"]["stepCurrent"])
    assert after < 150 and after - before <= 3  # stopped within about one step of the kill
    # the worker is free again
    assert server.wait(project, server.run(project, SMALL)["taskid"])["pexit"] == "0"
    assert server.detail(project, queued)["status"] == "task_cancel"


def test_progress_is_recorded_per_step(server, project):
    task = server.wait(project, server.run(project, {**SMALL, "steps": 5})["taskid"])
    assert task["progress"]["stepCurrent"] == "5" and task["progress"]["stepTotal"] == "5"
    assert task["progress"]["percentage"] == "100" and task["progress"]["speedType"] == "it/s"


def test_output_file_needs_the_access_key(server, project):
    task = server.wait(project, server.run(project, SMALL)["taskid"])
    url = task["outputs"][0]["url"]
    assert httpx.get(url).headers["content-type"] == "image/png"
    wrong = url.replace(task["outputs"][0]["accesskey"], "x" * 30)
    r = httpx.get(wrong)
    assert r.status_code == 404 and r.json()["result"] is False


def test_restart_loses_no_queued_task(tmp_path):
    from conftest import Server

    # no grace period: the stop must interrupt the running task, however fast this machine runs it
    # (with the default 5 s grace a quick machine finishes it, and it rightly ends with pexit 0)
    srv = Server(tmp_path, env={"EASEL_SHUTDOWN_GRACE_SECONDS": "0"}).start()
    try:
        p = srv.project()
        first = srv.run(p, {**SMALL, "steps": 150, "width": 256, "height": 256, "samples": 2})["taskid"]
        queued = [srv.run(p, SMALL)["taskid"] for _ in range(2)]
        srv.wait(p, first, until=("task_output",))
    finally:
        srv.stop()
    srv.start()
    try:
        interrupted = srv.wait(p, first)
        assert interrupted["pexit"] == "1" and "server stopped" in interrupted["debugerror"]
        for tid in queued:
            assert srv.wait(p, tid)["pexit"] == "0"
    finally:
        srv.stop()


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("how", ["terminate", "kill"])
def test_workers_exit_with_the_server(tmp_path, how):
    import subprocess as sp

    srv = Server(tmp_path).start()
    children = [int(x) for x in sp.run(["ps", "-o", "pid=", "--ppid", str(srv.proc.pid)], capture_output=True,
                                       text=True).stdout.split()]
    workers = [pid for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert workers, children
    getattr(srv.proc, how)()  # SIGTERM: graceful shutdown stops them; SIGKILL: they notice the parent is gone
    srv.proc.wait(20)
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers)


def test_a_killed_server_leaves_no_task_running(tmp_path):
    srv = Server(tmp_path).start()
    p = srv.project()
    taskid = srv.run(p, {**SMALL, "steps": 150, "width": 256, "height": 256, "samples": 2})["taskid"]
    srv.wait(p, taskid, until=("task_output",))
    srv.proc.kill()  # no graceful shutdown: the worker must notice on its own
    srv.proc.wait(20)
    deadline = time.time() + 20
    while time.time() < deadline and srv.store.get_task(int(taskid)).status != "task_postprocess_end":
        time.sleep(0.2)
    task = srv.store.get_task(int(taskid))
    assert task.status == "task_postprocess_end" and task.pexit == "1" and "server stopped" in task.debugerror


def test_a_dead_worker_is_replaced_and_its_task_fails(tmp_path):
    import os
    import signal
    import subprocess as sp

    srv = Server(tmp_path).start()
    try:
        p = srv.project()
        taskid = srv.run(p, {**SMALL, "steps": 150, "width": 256, "height": 256, "samples": 2})["taskid"]
        srv.wait(p, taskid, until=("task_output",))
        children = [int(x) for x in sp.run(["ps", "-o", "pid=", "--ppid", str(srv.proc.pid)], capture_output=True,
                                           text=True).stdout.split()]
        (worker,) = [pid for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
        os.kill(worker, signal.SIGKILL)  # what the OOM killer does
        dead = srv.wait(p, taskid, timeout=30)
        assert dead["pexit"] == "1" and "worker process running this task died (exit code -9" in dead["debugerror"]
        after = srv.wait(p, srv.run(p, SMALL)["taskid"], timeout=120)  # a new worker runs the next task
        assert after["pexit"] == "0"
    finally:
        srv.stop()
