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
                      "EASEL_ACCEPT_LICENSES": "flux.1-dev,bria-rmbg-1.4,antelopev2", "EASEL_DOWNLOAD_RESERVE_BYTES": "0"}).start()
    yield srv
    srv.stop()


def _seed_request(tool: str) -> tuple[dict, str]:
    """The tool seed's own curl request: its headers and its body, verbatim."""
    from test_conformance import SEED_FILES, seed_curl, seed_sections

    (seed,) = [f for f in SEED_FILES if f"/v1/Run/{tool}" in f.read_text()]
    url, headers, body = seed_curl(seed_sections(seed)["Run Command - Make HTTP Post Request"])
    assert url.endswith(f"/v1/Run/{tool}")
    return headers, body


def _run_seed(hub_server, project, tool: str, timeout: float = 300) -> tuple[dict, dict]:
    """Post the seed's body byte for byte (its image inputs uploaded before); the ended task and the body."""
    headers, body = _seed_request(tool)
    r = hub_server.post(project, f"/v1/Run/{tool}", headers={"Content-Type": headers["Content-Type"]},
                        content=body.encode())
    assert r.json()["result"], r.text
    task, _ = _follow(hub_server, project, r.json()["taskid"], timeout=timeout)
    assert task["pexit"] == "0", task["debugerror"]
    return task, json.loads(body)


def _upload(hub_server, project, name: str, data: bytes) -> None:
    r = hub_server.post(project, "/v1/File/Upload", files={"file": (name, data)}).json()
    assert r["result"] is True, r


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
    headers, body = _seed_request(SD)
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
    from easel.cli.follow import progress_of
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


def test_ic_light_seed_request_runs_on_the_fetched_weights(hub, hub_server):
    """The IC-Light seed's request, verbatim, its two images uploaded first under the names it uses:
    IC-Light's fbc offset, RMBG-1.4 (licence accepted) and the SD 1.5 base come from the Hub."""
    from test_ic_light import BG, FG

    project = hub_server.project()
    _upload(hub_server, project, "bg-img2.png", BG)
    _upload(hub_server, project, "ic-light.png", FG)
    task, body = _run_seed(hub_server, project, "wiro/ic-light-background", timeout=900)
    assert [o["name"] for o in task["outputs"]] == ["0.png"] and len(hub_server.images(task)[0]) > 0
    assert task["progress"]["stepTotal"] == str(1 + body["steps"] + body["steps"])  # matting, low-res, high-res
    fetched = hub.fetched()
    assert "lllyasviel/ic-light/iclight_sd15_fbc.safetensors" in fetched
    assert not any(p.startswith("lllyasviel/ic-light/") and "fbc" not in p for p in fetched)
    assert "briaai/RMBG-1.4/model.safetensors" in fetched
    assert not any(p.startswith("briaai/RMBG-1.4/") and not p.endswith(("model.safetensors", ".json"))
                   for p in fetched)


def test_instantid_seed_request_runs_on_the_fetched_weights(hub, hub_server):
    """The InstantID seed's request, verbatim, its portrait uploaded first: SDXL, IdentityNet, the
    IP-Adapter and antelopev2 (licence accepted) come from the Hub; no LoRA, no extra ControlNet."""
    from test_instantid_server import _photo_bytes

    project = hub_server.project()
    _upload(hub_server, project, "input-portrait-2.jpg", _photo_bytes())
    task, _ = _run_seed(hub_server, project, "wiro/instant-id-controlnet-lora", timeout=900)
    assert [o["name"] for o in task["outputs"]] == ["0.png"]
    assert "face: box=" in task["debugoutput"] and "seed=3572004920" in task["debugoutput"]
    fetched = hub.fetched()
    assert "InstantX/InstantID/ip-adapter.bin" in fetched
    assert "InstantX/InstantID/ControlNetModel/diffusion_pytorch_model.safetensors" in fetched
    assert any(p.startswith("DIAMONIK7777/antelopev2/") for p in fetched)
    assert not any(p.startswith(("nerijs/", "diffusers/controlnet", "thibaud/")) for p in fetched)


def test_flux_tool_seed_request_runs_on_gated_flux_with_a_token(hub, hub_server):
    """The FLUX tool seed's request, verbatim: gated FLUX.1-dev (licence accepted, HF_TOKEN set),
    and no LoRA (its ``selectedLoraModel`` is empty)."""
    project = hub_server.project()
    task, body = _run_seed(hub_server, project, "wiro/text-to-image-flux-lora-fast", timeout=900)
    assert len(task["outputs"]) == body["samples"] == 1
    assert "black-forest-labs/FLUX.1-dev/transformer/diffusion_pytorch_model.safetensors" in hub.fetched()
    assert not any("RealismLora" in p for p in hub.fetched())
