"""`easel serve --model-source hub` against the loopback Hub (``tests/hubserver.py``): a first Run
on missing weights shows "Downloading" progress (bytes) in Task/Detail, runs the seed's own
request on the fetched weights, a kill mid-download leaves no partial file, a failed download
fails the task with the source and the reason."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import TIME_SCALE, Server
from hubserver import HubServer, seed_repos

SD = "wiro/text-to-image-sd-lora"


@pytest.fixture(scope="module")
def hub(tiny, tmp_path_factory):
    server = HubServer(seed_repos(tiny, tmp_path_factory.mktemp("hubfiles"))).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hub_server(hub, tmp_path_factory):
    data = tmp_path_factory.mktemp("easel-hub")
    (data / "catalog.override.json").write_text(json.dumps({"models": {
        "881": {"source": {"type": "hf", "repo": "nobody/nothing", "files": ["x.safetensors"]}},  # not on the Hub
        "comics-factory-v1": {"source": {"type": "hf", "repo": "easel-test/comics-factory-v1",
                                         "files": ["comics_factory_v1.safetensors"]}}}}))
    srv = Server(data, extra_args=("--model-source", "hub"),
                 env={"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test_token", "HF_HOME": str(data / "hf-home"),
                      "EASEL_ACCEPT_LICENSES": "flux.1-dev", "EASEL_DOWNLOAD_RESERVE_BYTES": "0"}).start()
    yield srv
    srv.stop()


def _follow(server, project, taskid: str, timeout: float = 300) -> tuple[dict, list[dict]]:
    """Poll Task/Detail until the task ends; return it and every distinct progress seen."""
    seen: list[dict] = []
    deadline = time.time() + timeout * TIME_SCALE
    while time.time() < deadline:
        task = server.detail(project, taskid)
        if task.get("progress") and task["progress"] not in seen:
            seen.append(task["progress"])
        if task["status"] in ("task_postprocess_end", "task_cancel"):
            return task, seen
        time.sleep(0.05)
    raise AssertionError(f"task {taskid} did not end: {task}")


def test_sd_seed_request_downloads_with_progress_then_runs(hub, hub_server):
    """The SD tool seed's own request, verbatim, on a server that has no weights yet."""
    from test_conformance import SEED_FILES, seed_curl, seed_sections

    (seed,) = [f for f in SEED_FILES if SD in f.read_text()[:300]]
    url, headers, body = seed_curl(seed_sections(seed)["Run Command - Make HTTP Post Request"])
    project = hub_server.project()
    hub.throttle = 4_000_000  # bytes/s: the download lasts a few seconds, as real ones do
    try:
        r = hub_server.post(project, f"/v1/Run/{SD}", headers={"Content-Type": headers["Content-Type"]},
                            content=body.encode())
        assert r.json()["result"], r.text
        task, seen = _follow(hub_server, project, r.json()["taskid"])
    finally:
        hub.throttle = 0
    assert task["pexit"] == "0", task["debugerror"]
    assert len(task["outputs"]) == json.loads(body)["samples"]
    downloads = [p for p in seen if p["task"] == "Downloading"]
    assert downloads and downloads[-1]["speedType"] == "B/s"
    total = int(downloads[0]["stepTotal"])
    assert total > 5_000_000 and all(int(p["stepTotal"]) == total for p in downloads)
    assert any(0 < int(p["stepCurrent"]) < total for p in downloads)  # bytes done of total, mid-way
    fetched = hub.fetched("CompVis/stable-diffusion-v1-4")
    assert "unet/diffusion_pytorch_model.safetensors" in fetched and not any(".bin" in p or "fp16" in p for p in fetched)
    assert any(p["task"] == "Generate" for p in seen)
    # the same progress reaches WebSocket clients as progressGenerate frames (replayed history here)
    from easel.cli.main import progress_of
    from test_live import ws_frames

    frames = [progress_of(f) for f in ws_frames(hub_server, r.json()["socketaccesstoken"])]
    live = [f for f in frames if f.get("task") == "Downloading"]
    assert live and live[-1]["stepTotal"] == str(total) and live[-1]["type"] == "progressGenerate"


def test_a_kill_during_the_download_ends_the_task_and_leaves_no_partial_file(hub, hub_server):
    project = hub_server.project()
    hub.throttle = 500_000
    try:
        r = hub_server.run(project, {"selectedModel": "482", "selectedLoraModel": [], "samples": 1, "steps": 2,
                                     "width": 64, "height": 64, "prompt": "a fish"}, tool=SD)
        taskid = r["taskid"]
        deadline = time.time() + 60 * TIME_SCALE
        while time.time() < deadline:
            progress = hub_server.detail(project, taskid).get("progress") or {}
            if progress.get("task") == "Downloading" and int(progress["stepCurrent"]) > 0:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("no download progress was shown")
        kill = hub_server.post(project, "/v1/Task/Kill", json={"taskid": taskid}).json()
        assert kill["result"], kill
        task, _ = _follow(hub_server, project, taskid, timeout=60)
    finally:
        hub.throttle = 0
    assert task["status"] == "task_cancel" and "killed" in task["debugerror"]
    hub_root = Path(hub_server.data_dir) / "models" / "hub"
    partial = hub_root / ".partial"
    assert not partial.exists() or list(partial.iterdir()) == []
    folder = hub_root / "models--SG161222--Realistic_Vision_V6.0_B1_noVAE" / "main"
    assert not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_a_failed_download_fails_the_task_with_the_source_and_the_reason(hub_server):
    project = hub_server.project()
    r = hub_server.run(project, {"selectedModel": "881", "selectedLoraModel": [], "samples": 1, "steps": 2,
                                 "width": 64, "height": 64, "prompt": "x"}, tool=SD)
    assert r["result"], r
    task, _ = _follow(hub_server, project, r["taskid"], timeout=60)
    assert task["pexit"] == "1" and "selectedModel: nobody/nothing@main does not exist on the Hub" in task["debugerror"]


def test_comics_factory_with_an_operator_set_lora_runs_on_gated_flux_with_a_token(hub, hub_server):
    project = hub_server.project()
    r = hub_server.run(project, {"prompt": "ComicsFact1 style. a detective", "samples": 1, "steps": 2, "scale": 3.5,
                                 "seed": "7", "width": 64, "height": 64}, tool="Adel_AI/Comics-Factory-v1")
    assert r["result"], r
    task, _ = _follow(hub_server, project, r["taskid"])
    assert task["pexit"] == "0", task["debugerror"]
    assert "easel-test/comics-factory-v1/comics_factory_v1.safetensors" in hub.fetched()
    assert "black-forest-labs/FLUX.1-dev/transformer/diffusion_pytorch_model.safetensors" in hub.fetched()
