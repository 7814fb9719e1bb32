"""The OpenAI-compatible Images API through the official clients against a real ``easel serve``:
the Python ``openai`` package (a test dependency) and the Node ``openai`` package (installed with
npm when missing, outside the repository), generation with the three text-to-image tools, edits
with IC-Light and InstantID, streaming with partial images, errors decoded into the clients' own
exception types, tasks seen through Wiro (Task/List, the WebSocket, Kill), the deadline, load."""
from __future__ import annotations

import asyncio
import base64
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

from conftest import TIME_SCALE, png_size
from easel.synthetic.tiny_faces import draw_test_face
from test_ic_light import BG, FG
from test_live import ws_frames

ROOT = Path(__file__).resolve().parent.parent
SD_EXTRA = {"steps": 2, "seed": "42", "selectedLoraModel": [], "clipSkip": 0}
TIMEOUT = 120 * TIME_SCALE


@pytest.fixture(scope="module")
def key(server):
    return server.project(auth="apikey").apikey


def _client(server, key, **kw) -> OpenAI:
    return OpenAI(base_url=f"{server.base}/v1", api_key=key, max_retries=0, timeout=TIMEOUT, **kw)


def _decoded(items) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in items]


def _wiro(server, key, path: str, fields: dict) -> dict:
    r = httpx.post(f"{server.base}{path}", headers={"x-api-key": key}, json=fields, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _wait_running(server, key, prompt: str) -> dict:
    deadline = time.time() + 60 * TIME_SCALE
    while time.time() < deadline:
        for task in _wiro(server, key, "/v1/Task/List", {"limit": 50})["tasklist"]:
            if task["parameters"].get("prompt") == prompt and task["status"] == "task_output":
                return task
        time.sleep(0.05)
    raise AssertionError(f"no running task with prompt {prompt!r}")


def test_generate_with_each_text_to_image_tool(server, key):
    server_url = server.base
    # snippet: python-generate
    import base64

    from openai import OpenAI

    client = OpenAI(base_url=f"{server_url}/v1", api_key=key)
    result = client.images.generate(
        model="sd-lora", prompt="a lighthouse at dusk", n=2, size="64x64", response_format="b64_json",
        extra_body={"steps": 2, "seed": "42", "selectedLoraModel": [], "clipSkip": 0})
    images = [base64.b64decode(d.b64_json) for d in result.data]
    # end snippet
    assert len(images) == 2 and all(png_size(b) == (64, 64) for b in images) and images[0] != images[1]
    assert result.output_format == "png" and result.size == "64x64" and abs(result.created - time.time()) < 600

    client = _client(server, key)
    flux = client.images.generate(model="wiro/text-to-image-flux-lora-fast", prompt="a lion", n=2, size="64x64",
                                  response_format="url", extra_body={"steps": 2, "seed": "7"})
    assert len(flux.data) == 2 and all(d.b64_json is None for d in flux.data)
    files = [httpx.get(d.url, timeout=30).content for d in flux.data]
    assert all(png_size(f) == (64, 64) for f in files) and files[0] != files[1]

    comics = client.images.generate(model="comics-factory", prompt="ComicsFact1 style. a detective", n=2,
                                    size="64x64", output_format="jpeg", extra_body={"steps": 2})
    pictures = _decoded(comics.data)
    assert [p.format for p in pictures] == ["JPEG", "JPEG"] and pictures[0].size == (64, 64)


def _portrait() -> bytes:
    image = Image.new("RGB", (96, 128), (128, 128, 128))
    draw_test_face(image, (30, 40, 62, 80), 0)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_edit_with_ic_light_and_instantid(server, key, tmp_path):
    (tmp_path / "person.png").write_bytes(FG)
    (tmp_path / "street.jpg").write_bytes(BG)
    client = _client(server, key)
    # snippet: python-edit
    relit = client.images.edit(
        model="ic-light", image=[open(tmp_path / "person.png", "rb"), open(tmp_path / "street.jpg", "rb")],
        prompt="a woman, sunset", response_format="b64_json",
        extra_body={"steps": 2, "seed": "7", "highres_scale": 1.5})
    # end snippet
    assert len(relit.data) == 1 and _decoded(relit.data)[0].size == (128, 192)  # IC-Light's size for this input

    face = client.images.edit(model="instant-id", image=("portrait.png", _portrait(), "image/png"), prompt="a portrait",
                              n=2, extra_body={"steps": 2, "seed": "7", "selectedLoraModel": "",
                                               "selectedControlnetModel": "", "scheduler": "DDIMScheduler"})
    faces = _decoded(face.data)
    assert len(faces) == 2 and faces[0].size == (120, 160) and faces[0].tobytes() != faces[1].tobytes()

    events = list(client.images.edit(model="ic-light", image=[FG, BG], prompt="a woman", stream=True,
                                     partial_images=1, extra_body={"steps": 2, "seed": "7"}))
    assert [e.type for e in events][-1] == "image_edit.completed" and len(events) <= 2
    assert {e.type for e in events} <= {"image_edit.partial_image", "image_edit.completed"}

    with pytest.raises(openai.BadRequestError) as exc:  # IC-Light takes a foreground and a background
        client.images.edit(model="ic-light", image=[FG, BG, BG], prompt="x")
    assert exc.value.status_code == 400 and exc.value.param == "image"
    with pytest.raises(openai.BadRequestError) as exc:  # the background is required (bg_source's default)
        client.images.edit(model="ic-light", image=FG, prompt="x")
    assert exc.value.param == "image" and "image 2 of 2" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.edit(model="ic-light", image=FG, mask=FG, prompt="x")
    assert exc.value.param == "mask" and "mask" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.edit(model="ic-light", image=FG, prompt="x", size="512x512")
    assert exc.value.param == "size"


def test_stream_partial_images_from_step_previews(server, key):
    client = _client(server, key)
    # snippet: python-stream
    stream = client.images.generate(
        model="sd-lora", prompt="a red fish", size="64x64", stream=True, partial_images=2,
        extra_body={"steps": 10, "seed": "42", "selectedLoraModel": [], "clipSkip": 0})
    events = []
    for event in stream:
        events.append(event)
        if event.type == "image_generation.partial_image":
            print(f"partial image {event.partial_image_index}: {len(event.b64_json)} base64 characters")
        elif event.type == "image_generation.completed":
            final = base64.b64decode(event.b64_json)
    # end snippet
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert all(Image.open(io.BytesIO(base64.b64decode(e.b64_json))).format == "PNG" for e in events)
    assert png_size(final) == (64, 64)


def test_errors_come_in_openais_shape_and_types(server, key):
    client = _client(server, key)
    cases = [  # (call kwargs, exception type, status, param)
        ({"model": "sd-lora", "prompt": "x", "size": "big"}, openai.BadRequestError, 400, "size"),
        ({"model": "sd-lora", "prompt": "x", "size": "4096x4096"}, openai.BadRequestError, 400, "size"),
        ({"model": "dall-e-3", "prompt": "x"}, openai.NotFoundError, 404, "model"),
        ({"model": "sd-lora", "prompt": "x", "quality": "hd"}, openai.BadRequestError, 400, "quality"),
        ({"model": "sd-lora", "prompt": "x", "style": "vivid"}, openai.BadRequestError, 400, "style"),
        ({"model": "sd-lora", "prompt": "x", "n": 9}, openai.BadRequestError, 400, "n"),
        ({"model": "ic-light", "prompt": "x"}, openai.BadRequestError, 400, "model"),
        ({"model": "sd-lora", "prompt": "x", "extra_body": {"stepz": 2}}, openai.BadRequestError, 400, "stepz"),
        ({"model": "sd-lora", "prompt": "x", "extra_body": {"steps": 500}}, openai.BadRequestError, 400, "steps"),
        ({"model": "sd-lora", "prompt": "x", "extra_body": {"scheduler": "Nope"}}, openai.BadRequestError, 400,
         "scheduler"),
        ({"model": "sd-lora", "prompt": "x", "response_format": "url", "output_format": "webp"},
         openai.BadRequestError, 400, "output_format"),
    ]
    before = _wiro(server, key, "/v1/Task/List", {})["total"]
    for kwargs, kind, status, param in cases:
        with pytest.raises(kind) as exc:
            client.images.generate(**kwargs)
        assert exc.value.status_code == status and exc.value.param == param, (kwargs, exc.value.body)
        assert set(exc.value.body) == {"message", "type", "param", "code"} and exc.value.message, exc.value.body
    assert _wiro(server, key, "/v1/Task/List", {})["total"] == before  # refused requests make no task
    r = httpx.post(f"{server.base}/v1/images/generations", json={"model": "sd-lora", "prompt": "x", "size": "big"},
                   headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 400 and set(r.json()) == {"error"} and r.json()["error"]["type"] == "invalid_request_error"
    assert "WIDTHxHEIGHT" in r.json()["error"]["message"] and "64..2048" in r.json()["error"]["message"]

    with pytest.raises(openai.AuthenticationError) as exc:  # the client refuses no key: leave its header out
        client.images.generate(model="sd-lora", prompt="x", extra_headers={"Authorization": openai.omit})
    assert exc.value.status_code == 401 and "API key" in exc.value.message
    with pytest.raises(openai.AuthenticationError) as exc:
        _client(server, "not-a-key").images.generate(model="sd-lora", prompt="x")
    assert exc.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError) as exc:  # a signature project cannot use a bare key
        _client(server, server.project().apikey).images.generate(model="sd-lora", prompt="x")
    assert "--auth apikey" in exc.value.message


def test_models_are_the_tools(server, key):
    client = _client(server, key)
    ids = [m.id for m in client.models.list()]
    assert ids and set(ids) == {"wiro/text-to-image-sd-lora", "wiro/text-to-image-flux-lora-fast",
                                "Adel_AI/Comics-Factory-v1", "wiro/ic-light-background",
                                "wiro/instant-id-controlnet-lora"}
    model = client.models.retrieve("wiro/text-to-image-sd-lora")
    assert (model.id, model.object, model.owned_by) == ("wiro/text-to-image-sd-lora", "model", "wiro")
    assert client.models.retrieve("comics-factory").id == "Adel_AI/Comics-Factory-v1"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-image-1")


def test_an_openai_task_is_an_ordinary_wiro_task(server, key):
    from test_metrics import _Hooks

    hooks = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    client = _client(server, key)
    try:
        callback = f"http://127.0.0.1:{hooks.server_address[1]}/hook"  # a Wiro webhook, named in extra_body
        raw = client.images.with_raw_response.generate(
            model="sd-lora", prompt="an ordinary task", size="64x64", extra_body={**SD_EXTRA, "callbackUrl": callback},
            extra_headers={"Idempotency-Key": "oai-1"})
        taskid = raw.headers["x-easel-task-id"]
        assert len(raw.parse().data) == 1
        deadline = time.time() + 30 * TIME_SCALE
        while not any(json.loads(body)["id"] == taskid for body in _Hooks.received):
            assert time.time() < deadline, "no webhook for the task"
            time.sleep(0.1)
    finally:
        hooks.shutdown()
    metrics = httpx.get(f"{server.base}/metrics", timeout=30).text.splitlines()
    assert any(line.startswith("easel_http_requests_total{") and 'route="/v1/images/generations"' in line
               and 'status="200"' in line for line in metrics)
    again = client.images.with_raw_response.generate(model="sd-lora", prompt="an ordinary task", size="64x64",
                                                     extra_body=SD_EXTRA, extra_headers={"Idempotency-Key": "oai-1"})
    assert again.headers["x-easel-task-id"] == taskid and again.parse().data == raw.parse().data  # Wiro's idempotency
    listed = _wiro(server, key, "/v1/Task/List", {"limit": 5})["tasklist"]
    task = next(t for t in listed if t["id"] == taskid)
    assert task["status"] == "task_postprocess_end" and task["pexit"] == "0"
    assert (task["modelslugowner"], task["modelslugproject"]) == ("wiro", "text-to-image-sd-lora")
    assert task["parameters"]["prompt"] == "an ordinary task" and task["parameters"]["samples"] == 1
    assert [o["name"] for o in task["outputs"]] == ["0.png"]
    frames = ws_frames(server, task["socketaccesstoken"])
    assert frames[0]["type"] == "task_queue" and frames[-1]["type"] == "task_postprocess_end"
    assert all(f["id"] == taskid and f["result"] is True for f in frames)
    assert frames[-1]["message"][0]["url"] == task["outputs"][0]["url"]


def _killed_while_running(server, key, prompt: str, call) -> tuple[dict, openai.APIError]:
    """Run ``call()`` (an OpenAI request for a long task with ``prompt``) in a thread, kill its task
    through Wiro's Task/Kill once it runs, and return the task and what the call raised."""
    failure: list[BaseException] = []

    def run():
        try:
            call()
        except openai.APIError as exc:
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    task = _wait_running(server, key, prompt)
    assert _wiro(server, key, "/v1/Task/Kill", {"taskid": task["id"]})["result"]
    thread.join(TIMEOUT)
    assert not thread.is_alive() and len(failure) == 1
    return task, failure[0]


def test_kill_through_wiro_ends_the_openai_request(server, key):
    client = _client(server, key)
    long = {**SD_EXTRA, "steps": 150}
    task, exc = _killed_while_running(server, key, "to be killed", lambda: client.images.generate(
        model="sd-lora", prompt="to be killed", size="512x512", extra_body=long))
    assert isinstance(exc, openai.ConflictError) and exc.status_code == 409 and exc.code == "task_killed"
    assert task["id"] in exc.message and exc.response.headers["x-should-retry"] == "false"
    # a stream ends with an error event, which the client raises
    task, exc = _killed_while_running(server, key, "streamed, then killed", lambda: list(client.images.generate(
        model="sd-lora", prompt="streamed, then killed", size="512x512", stream=True, extra_body=long)))
    assert f"Task {task['id']} was killed" in exc.message and exc.body["code"] == "task_killed"


def test_the_deadline_answers_504_with_the_task_id(server, key):
    client = _client(server, key)
    with pytest.raises(openai.InternalServerError) as exc:
        client.images.generate(model="sd-lora", prompt="too slow", size="512x512",
                               extra_body={**SD_EXTRA, "steps": 150}, extra_headers={"Prefer": "wait=1"})
    assert exc.value.status_code == 504 and exc.value.code == "deadline_exceeded"
    taskid = exc.value.response.headers["x-easel-task-id"]
    assert f"Task {taskid} " in exc.value.message and "/v1/Task/Detail" in exc.value.message
    task = _wiro(server, key, "/v1/Task/Detail", {"taskid": taskid})["tasklist"][0]
    assert task["status"] not in ("task_postprocess_end", "task_cancel")  # it keeps running
    _wiro(server, key, "/v1/Task/Kill", {"taskid": taskid})


def test_a_client_that_goes_away_leaves_its_task_running_by_default(server, key):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base}/v1/images/generations", headers={"Authorization": f"Bearer {key}"}, timeout=2,
                   json={"model": "sd-lora", "prompt": "left behind", "size": "512x512", **SD_EXTRA, "steps": 150})
    task = _wait_running(server, key, "left behind")
    time.sleep(1.5)  # longer than the server's disconnect check
    assert _wiro(server, key, "/v1/Task/Detail", {"taskid": task["id"]})["tasklist"][0]["status"] == "task_output"
    _wiro(server, key, "/v1/Task/Kill", {"taskid": task["id"]})


def test_kill_on_disconnect_and_the_concurrency_limit(tmp_path):
    from conftest import Server

    srv = Server(tmp_path, ("--workers", "0"), env={"EASEL_OPENAI_KILL_ON_DISCONNECT": "true",
                                                   "EASEL_MAX_CONCURRENT_TASKS": "1"}).start()
    try:
        key = srv.project(auth="apikey").apikey
        with pytest.raises(httpx.ReadTimeout):  # no worker: the task stays queued until the client goes
            httpx.post(f"{srv.base}/v1/images/generations", headers={"Authorization": f"Bearer {key}"}, timeout=1,
                       json={"model": "sd-lora", "prompt": "abandoned"})
        deadline = time.time() + 20 * TIME_SCALE
        while time.time() < deadline:
            task = _wiro(srv, key, "/v1/Task/List", {})["tasklist"][0]
            if task["status"] == "task_cancel":
                break
            time.sleep(0.1)
        assert task["parameters"]["prompt"] == "abandoned" and task["status"] == "task_cancel", task["status"]
        client = _client(srv, key)
        with pytest.raises(openai.InternalServerError) as exc:  # queued for good (no worker): the deadline
            client.images.generate(model="sd-lora", prompt="queued", extra_headers={"Prefer": "wait=1"})
        assert exc.value.status_code == 504
        with pytest.raises(openai.RateLimitError) as exc:  # the project's one unfinished task is that one
            client.images.generate(model="sd-lora", prompt="one too many")
        assert exc.value.status_code == 429 and exc.value.code == "rate_limit_exceeded"
        assert "concurrent task limit" in exc.value.message and "EASEL_MAX_CONCURRENT_TASKS" in exc.value.message
    finally:
        srv.stop()


NODE_DIR = Path(os.environ.get("EASEL_TEST_NODE_DIR", Path.home() / ".cache" / "easel-tests" / "node"))


def _node_client() -> Path:
    """The folder holding ``node_modules/openai``: installed there with npm when missing."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed for the Node client test: scripts/test.sh installs Debian's nodejs and "
                    "npm when missing", pytrace=False)
    if not (NODE_DIR / "node_modules" / "openai" / "package.json").exists():
        NODE_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(NODE_DIR), "openai@latest"],
                       check=True, capture_output=True, timeout=300)
    return NODE_DIR


def test_the_official_node_client(server, key, tmp_path):
    folder = _node_client()
    script = folder / "openai_node.mjs"  # next to node_modules: ES modules resolve packages from their own folder
    shutil.copyfile(ROOT / "tests" / "openai_node.mjs", script)
    (tmp_path / "fg.png").write_bytes(FG)
    (tmp_path / "bg.png").write_bytes(BG)
    env = {**os.environ, "EASEL_BASE": server.base, "EASEL_KEY": key, "EASEL_FG": str(tmp_path / "fg.png"),
           "EASEL_BG": str(tmp_path / "bg.png"), "EASEL_OUT": str(tmp_path / "fish.png")}
    done = subprocess.run(["node", str(script)], env=env, capture_output=True, text=True, timeout=TIMEOUT * 2)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["generate"]["n"] == 2 and out["generate"]["png"] == ["PNG", "PNG"]
    assert len(out["flux"]["urls"]) == 2 and all(png_size(httpx.get(u).content) == (64, 64) for u in out["flux"]["urls"])
    assert out["edit"] == {"n": 1, "png": "PNG"}
    assert out["stream"] and png_size((tmp_path / "fish.png").read_bytes()) == (64, 64)
    assert "partial image 0:" in done.stderr and "partial image 1:" in done.stderr
    assert out["badSize"] == {"raised": "BadRequestError", "status": 400, "param": "size", "code": "invalid_value",
                              "isApiError": True}
    assert out["unknownModel"]["raised"] == "NotFoundError" and out["unknownModel"]["status"] == 404
    assert out["missingKey"]["raised"] == "AuthenticationError" and out["missingKey"]["status"] == 401
    assert "wiro/ic-light-background" in out["models"]


def test_load_200_concurrent_generations_from_50_clients(server):
    key = server.project(auth="apikey").apikey  # a project of its own: Task/List counts exactly these

    async def main():
        clients = [openai.AsyncOpenAI(base_url=f"{server.base}/v1", api_key=key, max_retries=0, timeout=TIMEOUT * 5)
                   for _ in range(50)]
        calls = [clients[i % 50].images.generate(model="sd-lora", prompt=f"load {i}", size="64x64",
                                                 response_format="url",
                                                 extra_body={**SD_EXTRA, "steps": 1})
                 for i in range(200)]
        try:
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await asyncio.gather(*(c.close() for c in clients))

    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    urls = [r.data[0].url for r in results]
    assert all(len(r.data) == 1 for r in results) and len(set(urls)) == 200  # each answered once, its own image
    listed = _wiro(server, key, "/v1/Task/List", {"limit": 200})
    assert listed["total"] == "200" and {t["parameters"]["prompt"] for t in listed["tasklist"]} == \
        {f"load {i}" for i in range(200)}
    assert all(t["status"] == "task_postprocess_end" and t["pexit"] == "0" for t in listed["tasklist"])


_SNIPPET = re.compile(r"^[ \t]*(?://|#) snippet: ([\w-]+)\n(.*?)^[ \t]*(?://|#) end snippet", re.M | re.S)


def test_docs_show_the_snippets_exactly_as_the_tests_run_them():
    import textwrap

    docs = (ROOT / "docs" / "openai.md").read_text()
    found = {}
    for path in (ROOT / "tests" / "test_openai.py", ROOT / "tests" / "openai_node.mjs"):
        for name, body in _SNIPPET.findall(path.read_text()):
            found[name] = textwrap.dedent(body)
    assert set(found) == {"python-generate", "python-edit", "python-stream", "node-generate", "node-edit",
                          "node-stream"}
    for name, body in found.items():
        assert body in docs, f"docs/openai.md lacks the {name} snippet as the test runs it:\n{body}"
