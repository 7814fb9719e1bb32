"""Conformance with Wiro's documented examples, driven by the pages themselves.

Every answer is compared with the example Wiro's pages (``../shared/wiro-docs``) and the five seed
tool pages (``../shared/seeds``) show for that endpoint: each documented key is present with the
documented value type (strings where they show strings, ``null`` where they show ``null``), and
the only keys beyond them are Easel's documented extensions. The WebSocket frames are compared
with every kind ``websocket.md`` shows. Then the official clients' habits: n8n's sign-once-reuse
headers and zero-valued fields, the Node library's clean slugs, the docs' Python WebSocket sample
and the seeds' curl bodies, verbatim.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import time
from pathlib import Path

import httpx
from PIL import Image
import pytest
from websockets.sync.client import connect

from conftest import SMALL, TOOL, Server
from easel.signing import signature

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.is_dir():  # a worktree beside ../shared, or the main checkout
    SHARED = Path("/work/shared")
DOCS, SEEDS = SHARED / "wiro-docs", SHARED / "seeds"

# Keys Easel adds beyond Wiro's examples (docs/api.md, "Beyond Wiro"); nothing else may appear.
TASK_EXTRAS = {"progress", "queueposition", "eta"}
TOOL_EXTRAS = {"available"}
ERROR_EXTRAS = {"detail"}
# code-examples.md's polling samples read a `data` object from the Run and Task/Detail answers
# (docs/api.md, "The data object"): added beside the flat fields, which stay exactly as documented
RUN_EXTRAS = {"data"}
DETAIL_EXTRAS = {"data"}
DOCUMENTED_ERRORS = {
    "Project authorization is not founded.", "Project authorization is not valid.",
    "Project requires signature authentication. x-signature and x-nonce headers are required.",
    "Error parsing url.", "Request parameters are invalid.", "tool-not-accessible", "slug-owner-project-not-exist",
    "There is no task yet.", "taskid or socketaccesstoken is required", "Task is not in a cancellable state.",
    "You don't have any permission for this action.", "task-not-exist",
    "Task must be completed or cancelled before deleting files", "Request parameter [prompt] required",
    "Request parameter [steps] must be integer or float", "Request parameter [steps] must be between 1 and 150",
    "Request parameter [inputImageUrl] required",
}


# -- the documented examples ----------------------------------------------------------------------


def json_objects(text: str) -> list:
    """Every JSON value in a ```json block of a page (``//`` comments dropped; a block may hold several)."""
    values = []
    for block in re.findall(r"```json\s*(.*?)```", text, re.S):
        block = re.sub(r"^\s*//.*$", "", block, flags=re.M)
        decoder, i = json.JSONDecoder(), 0
        while True:
            while i < len(block) and block[i] in " \t\r\n,":
                i += 1
            if i >= len(block):
                break
            value, i = decoder.raw_decode(block, i)
            values.append(value)
    return values


def seed_sections(path: Path) -> dict[str, str]:
    """A seed page split at its ``## `` headings (the pages are one line each)."""
    text = path.read_text()
    parts = re.split(r"## ([A-Z][^#`]*?) (?=```|Tool name|- name|This section|Completed)", text)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def seed_json(section: str) -> dict:
    """The JSON answer of a seed section; the seeds print ``categories`` with unescaped quotes
    (``"categories": "["tool",...]"``), which is read back as the JSON-encoded string it stands for."""
    raw = re.search(r"```json (.*?) ```", section, re.S).group(1)
    raw = re.sub(r'"categories": "(\[[^\]]*\])"', lambda m: '"categories": ' + json.dumps(m.group(1)), raw)
    return json.loads(raw)


def seed_curl(section: str) -> tuple[str, dict, str]:
    """(url, headers, body) of a seed's curl command, exactly as printed."""
    url = re.search(r'curl -X POST "([^"]+)"', section).group(1)
    headers = dict(re.findall(r'-H "([^:]+): ([^"]*)"', section))
    body = re.search(r"-d '(.*?)';", section, re.S).group(1)
    return url, headers, body


SEED_FILES = sorted(SEEDS.glob("*.txt"))
SEED = seed_sections(SEED_FILES[0])
SEED_DETAIL = seed_json(SEED["Get Task Detail - Response"])
SEED_KILL = seed_json(SEED["Kill Task - Response"])
SEED_CANCEL = seed_json(SEED["Cancel Task - Response"])
SEED_RUN = seed_json(SEED["Run Command - Response"])
TASKS_MD_DETAIL = json_objects((DOCS / "tasks.md").read_text())[-1]
MODELS = json_objects((DOCS / "models.md").read_text())
WS_FRAMES = [f for f in json_objects((DOCS / "websocket.md").read_text()) if "type" in f and "id" in f]


def check_value(ours, doc, path: str) -> None:
    """``ours`` has the JSON type ``doc`` has (None ↔ null, str, number, bool, list, object)."""
    if doc is None:
        assert ours is None, f"{path}: {ours!r} where the docs show null"
    elif isinstance(doc, bool):
        assert isinstance(ours, bool), f"{path}: {ours!r} is not a boolean"
    elif isinstance(doc, (int, float)):
        assert isinstance(ours, (int, float)) and not isinstance(ours, bool), f"{path}: {ours!r} is not a number"
    elif isinstance(doc, str):
        assert isinstance(ours, str), f"{path}: {ours!r} is not a string"
    elif isinstance(doc, list):
        assert isinstance(ours, list), f"{path}: {ours!r} is not an array"
    else:
        assert isinstance(ours, dict), f"{path}: {ours!r} is not an object"


def check_shape(ours: dict, docs: list[dict], extras: set[str] = frozenset(), path: str = "",
                exact: bool = True) -> None:
    """Every key the documented examples show is in ``ours`` with their type; with ``exact``, the
    only other keys are ``extras``. Nested objects (one level) and arrays of objects likewise."""
    documented: dict = {}
    for doc in docs:
        for k, v in doc.items():
            documented.setdefault(k, v)
    missing = set(documented) - set(ours)
    assert not missing, f"{path}: missing {sorted(missing)}"
    if exact:
        assert set(ours) - set(documented) <= set(extras), f"{path}: undocumented {sorted(set(ours) - set(documented) - set(extras))}"
    for k, v in documented.items():
        check_value(ours[k], v, f"{path}.{k}")
        if isinstance(v, dict) and v and isinstance(ours[k], dict) and k != "parameters":
            check_shape(ours[k], [d[k] for d in docs if isinstance(d.get(k), dict)], path=f"{path}.{k}", exact=exact)
        if isinstance(v, list) and v and isinstance(v[0], dict):
            for item in ours[k]:
                check_shape(item, [x for d in docs for x in (d.get(k) or []) if isinstance(x, dict)],
                            path=f"{path}.{k}[]", exact=exact)


def test_the_examples_were_read():
    """The pages parse into the examples the tests below compare with (a parser slip must fail here)."""
    assert len(SEED_FILES) == 5 and SEED_RUN == {"errors": [], "taskid": "2221",
                                                 "socketaccesstoken": "eDcCm5yyUfIvMFspTwww49OUfgXkQt", "result": True}
    assert SEED_KILL["tasklist"][0]["categories"].startswith('["tool"') and SEED_KILL["tasklist"][0]["guestid"] is None
    assert "total" not in SEED_KILL and SEED_DETAIL["total"] == "1" and "modelslugowner" in TASKS_MD_DETAIL["tasklist"][0]
    assert {m.get("tool", [{}])[0].get("title") for m in MODELS if "tool" in m} == {"Virtual Try-on"}
    kinds = {f["type"] for f in WS_FRAMES}
    assert {"task_accept", "task_assign", "task_output", "task_error", "task_output_full", "task_error_full",
            "task_postprocess_end"} <= kinds


# -- HTTP answers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def done(server, project):
    """A finished task (Run answer, Detail answer)."""
    answer = server.run(project, SMALL)
    server.wait(project, answer["taskid"])
    return answer, server.post(project, "/v1/Task/Detail", json={"tasktoken": answer["socketaccesstoken"]}).json()


def test_run_and_detail_answers(done):
    answer, detail = done
    check_shape(answer, [SEED_RUN], extras=RUN_EXTRAS)
    check_shape(detail, [SEED_DETAIL, TASKS_MD_DETAIL], exact=False)
    assert set(detail) == {"total", "errors", "tasklist", "result"} | DETAIL_EXTRAS
    assert answer["data"] == {"taskid": answer["taskid"], "socketaccesstoken": answer["socketaccesstoken"]}
    assert detail["data"] == {"taskid": answer["taskid"], "socketaccesstoken": answer["socketaccesstoken"],
                              "status": "end", "output": [o["url"] for o in detail["tasklist"][0]["outputs"]]}
    task = detail["tasklist"][0]
    check_shape(task, [SEED_DETAIL["tasklist"][0], TASKS_MD_DETAIL["tasklist"][0], SEED_KILL["tasklist"][0]],
                extras=TASK_EXTRAS, path="tasklist[]")
    assert task["pexit"] == "0" and json.loads(task["categories"]) == ["tool", "sd", "text-to-image", "lora-sd", "persistent"]
    assert re.fullmatch(r"\d+\.\d{4}", task["elapsedseconds"]) and task["modelid"] != "0"


def test_kill_and_cancel_answers_as_the_seeds_show(server, project, queue):
    srv, qproject = queue
    queued = srv.run(qproject, SMALL)
    cancel = srv.post(qproject, "/v1/Task/Cancel", json={"taskid": queued["taskid"]}).json()
    answer = server.run(project, {**SMALL, "steps": 150})
    server.wait(project, answer["taskid"], until=("task_output",))
    kill = server.post(project, "/v1/Task/Kill", json={"socketaccesstoken": answer["socketaccesstoken"]}).json()
    for got, seed in ((cancel, SEED_CANCEL), (kill, SEED_KILL)):
        check_shape(got, [seed], exact=False)
        assert set(got) == {"errors", "tasklist", "result"}  # no "total", as the seeds show
        task = got["tasklist"][0]
        check_shape(task, [seed["tasklist"][0], TASKS_MD_DETAIL["tasklist"][0]], extras=TASK_EXTRAS, path="tasklist[]")
        assert task["status"] == "task_cancel" and task["pexit"] == "0"  # as both seed answers show
        assert int(task["endtime"]) > 0 and re.fullmatch(r"\d+\.\d{4}", task["elapsedseconds"])
    assert cancel["tasklist"][0]["elapsedseconds"] == "0.0000" and cancel["tasklist"][0]["starttime"] == "0"
    assert float(kill["tasklist"][0]["elapsedseconds"]) > 0 and kill["tasklist"][0]["debugerror"]


def test_unstarted_task(queue):
    srv, qproject = queue
    task = srv.detail(qproject, srv.run(qproject, SMALL)["taskid"])
    assert (task["status"], task["pexit"], task["starttime"], task["endtime"], task["elapsedseconds"]) == \
        ("task_queue", "", "0", "0", "0.0000")
    srv.post(qproject, "/v1/Task/Cancel", json={"taskid": task["id"]})


def test_tool_list_detail_and_explore(server, project):
    list_doc = [m for m in MODELS if "total" in m]
    detail_doc = [m for m in MODELS if "tool" in m and "total" not in m]
    listed = server.post(project, "/v1/Tool/List", json={"start": "0", "limit": "20", "sort": "id"}).json()
    check_shape(listed, list_doc, exact=False)
    assert set(listed) == {"result", "errors", "total", "tool"}
    for item in listed["tool"]:
        check_shape(item, [d["tool"][0] for d in list_doc], extras=TOOL_EXTRAS, path="tool[]")
        assert isinstance(json.loads(item["dynamicprice"]), list)
    comics = next(t for t in listed["tool"] if t["slugowner"] == "Adel_AI")
    assert (comics["cleanslugowner"], comics["cleanslugproject"], comics["tags"]) == ("adel_ai", "comics-factory-v1", ["style"])
    detail = server.post(project, "/v1/Tool/Detail", json={"slugowner": "adel_ai", "slugproject": "comics-factory-v1"}).json()
    item = detail["tool"][0]
    docs_items = [d["tool"][0] for d in detail_doc]
    parameters = item.pop("parameters")
    check_shape(item, [{k: v for k, v in d.items() if k != "parameters"} for d in docs_items], extras=TOOL_EXTRAS,
                path="tool[]")
    # parameters: model-parameters.md's groups ({"title", "items": [{"id", "type", "label", "required", ...}]})
    assert all({"title", "items"} <= set(g) for g in parameters)
    assert all({"id", "type", "label", "required"} <= set(i) for g in parameters for i in g["items"])
    assert item["slugowner"] == "Adel_AI" and isinstance(item["dynamicprice"], str)
    # Tool/Explore as the Wiro MCP (src/types.ts ExploreResponse) and WiroKit (models/explore.ts) read it
    explore = server.post(project, "/v1/Tool/Explore", json={}).json()
    assert set(explore) == {"result", "errors", "explore"} and explore["result"] is True
    for category in explore["explore"]:
        assert isinstance(category["id"], str) and isinstance(category["title"], str)
        assert category["total"] == len(category["tools"]) > 0
        for tool in category["tools"]:
            check_shape(tool, [{"id": "", "cleanslugowner": "", "cleanslugproject": "", "image": "", "description": "",
                                "categories": [], "commentcount": "", "ratedusercount": "", "averagepoint": ""}],
                        exact=False, path="explore[].tools[]")
    names = {f"{t['cleanslugowner']}/{t['cleanslugproject']}" for c in explore["explore"] for t in c["tools"]}
    assert {"adel_ai/comics-factory-v1", "wiro/ic-light-background"} <= names  # runnable ones


def test_task_list_total_counts_every_match(server):
    p = server.project()
    for _ in range(3):
        server.run(p, SMALL)
    page = server.post(p, "/v1/Task/List", json={"start": "0", "limit": "1"}).json()
    assert page["total"] == "3" and len(page["tasklist"]) == 1
    mine = server.post(p, "/v1/Task/List", json={"type": "model", "sort": "id", "order": "DESC", "start": "0",
                                                 "limit": "20", "modelName": "WIRO/Text-To-Image-SD-Lora"}).json()
    assert mine["total"] == "3"  # the MCP's list_tasks body, model by clean slug
    none = server.post(p, "/v1/Task/List", json={"modelName": "adel_ai/comics-factory-v1"}).json()
    assert none["total"] == "0" and none["tasklist"] == []


def test_error_texts_are_the_documented_ones(server, project):
    def errors(r: httpx.Response) -> list[dict]:
        body = r.json()
        assert body["result"] is False
        return body["errors"]

    cases = [
        server.post(project, f"/v1/Run/{TOOL}", json={**SMALL, "prompt": ""}),
        server.post(project, f"/v1/Run/{TOOL}", json={k: v for k, v in SMALL.items() if k != "prompt"}),
        server.post(project, f"/v1/Run/{TOOL}", json={**SMALL, "steps": "many"}),
        server.post(project, f"/v1/Run/{TOOL}", json={**SMALL, "steps": 1000}),
        server.post(project, "/v1/Run/wiro/ic-light-background", json=SMALL),
        server.post(project, "/v1/Run/nobody/nothing", json=SMALL),
        server.post(project, f"/v1/Run/{TOOL}", content=b"{nope", headers={"Content-Type": "application/json"}),
        server.post(project, "/v1/Task/Detail", json={"taskid": "987654321"}),
        server.post(project, "/v1/Task/Detail", json={}),
        server.post(project, "/v1/Task/InputOutputDelete", json={"tasktoken": "not-a-token"}),
        httpx.post(f"{server.base}/v1/Task/Detail", json={}, headers={"x-api-key": "nope"}),
        httpx.post(f"{server.base}/v1/Nope"),
    ]
    seen = []
    for r in cases:
        for e in errors(r):
            assert set(e) - {"code", "message"} <= ERROR_EXTRAS and isinstance(e["code"], int)
            assert e["message"] in DOCUMENTED_ERRORS, e
            seen.append(e)
    assert seen[0] == seen[1] == {"code": 0, "message": "Request parameter [prompt] required"}
    assert seen[2] == {"code": 0, "message": "Request parameter [steps] must be integer or float", "detail": "written with ASCII digits (got 'many')"}
    assert seen[4]["code"] == 0 and seen[4]["message"] == "Request parameter [inputImageUrl] required"
    assert "File/Upload" in seen[4]["detail"]  # an image tool run without its image says how to send one
    assert seen[9] == {"code": 1, "message": "task-not-exist"}


# -- WebSocket frames -----------------------------------------------------------------------------


def frames_of(server, token: str) -> list[dict]:
    out = []
    with connect(server.base.replace("http", "ws") + "/v1", open_timeout=10) as ws:
        ws.send(json.dumps({"type": "task_info", "tasktoken": token}))
        while True:
            out.append(json.loads(ws.recv(timeout=120)))
            if out[-1]["type"] in ("task_postprocess_end", "task_cancel"):
                return out


def doc_frame(kind: str, message_type: type | None = None) -> dict:
    return next(f for f in WS_FRAMES if f["type"] == kind and (message_type is None or isinstance(f["message"], message_type)))


def test_every_websocket_frame_kind_matches_the_docs(server, project):
    ok = server.run(project, {**SMALL, "steps": 3})
    bad = server.run(project, {**SMALL, "selectedLoraModelPrivateUrl": "http://127.0.0.1:9/missing.safetensors"})
    frames = frames_of(server, ok["socketaccesstoken"]) + frames_of(server, bad["socketaccesstoken"])
    killed = server.run(project, {**SMALL, "steps": 150})
    server.wait(project, killed["taskid"], until=("task_output",))
    server.post(project, "/v1/Task/Kill", json={"taskid": killed["taskid"]})
    frames += frames_of(server, killed["socketaccesstoken"])
    progress_doc = doc_frame("task_output", dict)["message"]
    kinds = set()
    for f in frames:
        assert list(f) == ["type", "id", "tasktoken", "message", "result"], f  # no previews asked: no extra keys
        kinds.add(f["type"])
        message = f["message"]
        if f["type"] == "task_output":
            assert message.keys() == progress_doc.keys() and all(isinstance(v, str) for v in message.values()), message
            assert message["type"] == "progressGenerate" and message["task"] == "Generate"
        elif f["type"] == "task_error":
            assert isinstance(message, str) and message
        elif f["type"] in ("task_output_full", "task_error_full"):
            assert list(message) == list(doc_frame(f["type"])["message"]) == ["raw"] and isinstance(message["raw"], str)
        elif f["type"] == "task_postprocess_end":
            for item in message:
                check_shape(item, doc_frame("task_postprocess_end")["message"], exact=False)
        else:
            assert message is None, f  # lifecycle frames, task_cancel included
    assert {"task_queue", "task_accept", "task_preprocess_start", "task_preprocess_end", "task_assign", "task_start",
            "task_output", "task_error", "task_output_full", "task_error_full", "task_end", "task_postprocess_start",
            "task_postprocess_end", "task_cancel"} <= kinds
    for answer in (ok, bad):  # task_error_full only when stderr is non-empty, carrying all of it
        task = server.detail(project, answer["taskid"])
        full = [f for f in frames if f["id"] == answer["taskid"] and f["type"] == "task_error_full"]
        assert [f["message"]["raw"] for f in full] == ([task["debugerror"]] if task["debugerror"] else [])
    assert server.detail(project, bad["taskid"])["pexit"] == "1"


def test_the_docs_python_websocket_sample_verbatim(server, project):
    """websocket.md's Python example, as printed; only its URL and token are this server's."""
    code = re.search(r"### Python\s*```python\n(.*?)```", (DOCS / "websocket.md").read_text(), re.S).group(1)
    answer = server.run(project, {**SMALL, "steps": 3})
    code = code.replace("wss://socket.wiro.ai/v1", server.base.replace("http", "ws") + "/v1")
    code = code.replace('"your-socket-access-token"', json.dumps(answer["socketaccesstoken"]))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "websocket.md", "exec"), {"__name__": "sample"})
    printed = out.getvalue().splitlines()
    assert printed[0] == "Registered with WebSocket" and printed[-1] == "Task completed!"
    assert "Event: task_start" in printed and "Event: task_end" in printed
    partial = [line for line in printed if line.startswith("Partial output:")]
    assert len(partial) == 3 and "'type': 'progressGenerate', 'task': 'Generate'" in partial[0]
    assert any(line.startswith("Full output: {'raw': ") for line in printed)


# -- the official clients' habits -----------------------------------------------------------------


def n8n_headers(project) -> dict:
    """n8n's utils/auth.ts: one nonce (Unix seconds), signed once, reused for every request."""
    nonce = str(int(time.time()))
    return {"x-api-key": project.apikey, "x-nonce": nonce, "x-signature": signature(project.apikey, project.apisecret, nonce)}


def test_n8n_signs_once_and_reuses_the_headers(server):
    lenient, strict = server.project(), server.project(nonce_policy="strict")
    headers = n8n_headers(lenient)
    run = httpx.post(f"{server.base}/v1/Run/{TOOL}", headers=headers, json=SMALL).json()
    assert run["result"] is True
    for _ in range(10):  # utils/polling.ts: Task/Detail by tasktoken with the same headers
        r = httpx.post(f"{server.base}/v1/Task/Detail", headers={**headers, "Content-Type": "application/json"},
                       json={"tasktoken": run["socketaccesstoken"]})
        assert r.status_code == 200 and r.json()["result"] is True, r.text
    headers = n8n_headers(strict)
    assert httpx.post(f"{server.base}/v1/Run/{TOOL}", headers=headers, json=SMALL).json()["result"] is True
    again = httpx.post(f"{server.base}/v1/Task/Detail", headers=headers, json={"taskid": run["taskid"]})
    assert again.status_code == 401 and again.json()["errors"][0]["message"] == "Project authorization is not valid."
    assert "already used" in again.json()["errors"][0]["detail"]


def test_nonce_kinds_under_each_policy(server):
    lenient, strict = server.project(), server.project(nonce_policy="strict")

    def status(project, nonce: str) -> int:
        headers = {"x-api-key": project.apikey, "x-nonce": nonce,
                   "x-signature": signature(project.apikey, project.apisecret, nonce)}
        return httpx.post(f"{server.base}/v1/Tool/List", headers=headers, json={}).status_code

    nanos, stale = str(time.time_ns()), str(int(time.time()) - 3600)
    for nonce in ("4242424242", nanos, "7", str(int(time.time() * 1000))):
        assert status(lenient, nonce) == status(lenient, nonce) == 200  # any nonce, reused
        assert (status(strict, nonce), status(strict, nonce)) == (200, 401)  # random or current: once
    assert status(lenient, stale) == 200 and status(strict, stale) == 401  # a stale timestamp


def test_run_by_clean_slug_in_mixed_case(server, project):
    answer = server.run(project, {"prompt": "ComicsFact1 style. a cat", "width": 64, "height": 64, "steps": 2},
                        tool="ADEL_ai/comics-FACTORY-v1")
    task = server.wait(project, answer["taskid"])
    assert task["pexit"] == "0", task["debugerror"]
    assert (task["modelslugowner"], task["modelslugproject"]) == ("Adel_AI", "Comics-Factory-v1")  # canonical
    detail = server.post(project, "/v1/Tool/Detail", json={"slugowner": "ADEL_AI", "slugproject": "Comics-Factory-V1"})
    assert detail.json()["tool"][0]["slugproject"] == "Comics-Factory-v1"


def test_n8n_zeros_take_the_tools_defaults(queue):
    """The n8n TextToImageSdLora node's body with every optional field left empty."""
    srv, project = queue
    body = {"selectedModel": "", "selectedModelPrivate": "", "selectedLoraModel": "", "selectedLoraModelPrivate": "",
            "selectedLoraModelPrivateUrl": "", "prompt": "a lighthouse", "negativePrompt": "", "samples": 0, "steps": 0,
            "scale": 0, "seed": "", "clipSkip": 0, "width": 0, "height": 0, "scheduler": "DDIMScheduler"}
    answer = httpx.post(f"{srv.base}/v1/Run/{TOOL}", headers={**n8n_headers(project), "Content-Type": "application/json"},
                        json=body).json()
    assert answer["result"] is True, answer
    inputs = json.loads(srv.store.get_task(int(answer["taskid"])).inputs)
    assert (inputs["samples"], inputs["steps"], inputs["scale"], inputs["width"], inputs["height"]) == (4, 30, 7.5, 512, 512)
    assert inputs["clipSkip"] == 0  # 0 is a real clip skip (none), kept
    assert srv.detail(project, answer["taskid"])["parameters"]["steps"] == 0  # parameters: what was sent
    srv.post(project, "/v1/Task/Cancel", json={"taskid": answer["taskid"]})


def test_bom_and_missing_content_type_bodies(server, project):
    raw = json.dumps(SMALL).encode()
    for content, ctype in ((b"\xef\xbb\xbf" + raw, "application/json"), (raw, None), (b"\xef\xbb\xbf" + raw, None)):
        headers = server.headers(project)
        if ctype:
            headers["Content-Type"] = ctype
        r = httpx.post(f"{server.base}/v1/Run/{TOOL}", headers=headers, content=content)
        assert r.json()["result"] is True, r.text
        assert server.detail(project, r.json()["taskid"])["parameters"]["prompt"] == SMALL["prompt"]


def test_head_on_output_urls(done):
    url = done[1]["tasklist"][0]["outputs"][0]["url"]
    got, head = httpx.get(url), httpx.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(got.content)) and head.headers["content-type"] == "image/png"
    assert httpx.head(url.rsplit("/", 2)[0] + "/nope/0.png").status_code == 404


def test_cors_is_off_by_default_and_answers_preflight_for_listed_origins(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from easel.api import create_app
    from easel.config import Settings
    from easel.store import Store

    preflight = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "x-api-key,x-nonce,x-signature,content-type"}
    settings = Settings(data_dir=tmp_path)
    Store(settings.core.database_url).migrate()
    with TestClient(create_app(settings, None, dispatch_webhooks=False)) as http:
        r = http.options("/v1/Run/wiro/text-to-image-sd-lora", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
    with TestClient(create_app(settings.with_(cors_origins=("https://app.example.com",)), None,
                               dispatch_webhooks=False)) as http:
        r = http.options("/v1/Run/wiro/text-to-image-sd-lora", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "POST" in r.headers["access-control-allow-methods"]
        assert {"x-api-key", "x-nonce", "x-signature", "content-type"} <= set(
            h.strip() for h in r.headers["access-control-allow-headers"].lower().split(","))
        simple = http.post("/v1/Tool/List", headers={"Origin": "https://app.example.com", "x-api-key": "nope"})
        assert simple.headers["access-control-allow-origin"] == "https://app.example.com"
        other = http.options("/v1/Tool/List", headers={**preflight, "Origin": "https://evil.example"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    monkeypatch.setenv("EASEL_CORS_ORIGINS", "https://a.example, https://b.example")
    assert Settings.from_env(data_dir=tmp_path).api.cors_origins == ("https://a.example", "https://b.example")


# -- the seeds' curl examples, verbatim -----------------------------------------------------------


@pytest.fixture(scope="module")
def queue(tmp_path_factory):
    """A server without workers: tasks stay queued (for verbatim seed bodies and Cancel)."""
    srv = Server(tmp_path_factory.mktemp("conformance-queue"), extra_args=("--workers", "0")).start()
    yield srv, srv.project()
    srv.stop()


@pytest.mark.parametrize("seed", SEED_FILES, ids=lambda p: p.stem)
def test_the_seeds_curl_bodies_verbatim(queue, seed):
    srv, p = queue
    sections = seed_sections(seed)
    url, headers, body = seed_curl(sections["Run Command - Make HTTP Post Request"])
    path = url.replace("https://api.wiro.ai", "")
    tool = path.removeprefix("/v1/Run/")
    for name in [v for v in json.loads(body).values()
                 if isinstance(v, str) and re.fullmatch(r"[\w.-]+\.(png|jpe?g|webp)", v)]:
        # a bare file name: the seed's user uploaded it first with File/Upload, as Wiro's files.md shows
        png = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 30, 30)).save(png, format="PNG")
        up = srv.post(p, "/v1/File/Upload", files={"file": (name, png.getvalue(), "image/png")}).json()
        assert up["result"] is True, up
    auth = srv.headers(p)
    headers = {k: auth.get(k.lower(), v) for k, v in headers.items()}  # the seed's headers, this project's values
    r = httpx.post(srv.base + path, headers=headers, content=body.encode())
    answer = r.json()
    from easel.catalog import load_tools

    if not load_tools()[tool].module:
        assert answer["errors"][0]["message"] == "tool-not-accessible" and answer["errors"][0]["code"] == 1
        return
    assert answer["result"] is True, answer
    check_shape(answer, [SEED_RUN], extras=RUN_EXTRAS)
    sent = {k: v for k, v in json.loads(body).items() if k != "callbackUrl"}  # a sentence, not a URL: dropped
    for section, key, value in (("Get Task Detail - Make HTTP Post Request with Task ID", "taskid", answer["taskid"]),
                                ("Get Task Detail - Make HTTP Post Request with Socket Access Token", "tasktoken",
                                 answer["socketaccesstoken"])):
        _, _, detail_body = seed_curl(sections[section])
        detail_body = detail_body.replace(json.loads(detail_body)[key], value)
        detail = httpx.post(srv.base + "/v1/Task/Detail", headers={**headers, **srv.headers(p)},
                            content=detail_body.encode()).json()
        assert detail["tasklist"][0]["parameters"] == sent and detail["tasklist"][0]["status"] == "task_queue"
    _, _, cancel_body = seed_curl(sections["Cancel Task - Make HTTP Post Request (For tasks on queue)"])
    cancel_body = cancel_body.replace(json.loads(cancel_body)["taskid"], answer["taskid"])
    cancel = httpx.post(srv.base + "/v1/Task/Cancel", headers={**headers, **srv.headers(p)},
                        content=cancel_body.encode()).json()
    assert cancel["tasklist"][0]["status"] == "task_cancel"
    _, _, kill_body = seed_curl(sections["Kill Task - Make HTTP Post Request with Socket Access Token"])
    kill_body = kill_body.replace(json.loads(kill_body)["socketaccesstoken"], answer["socketaccesstoken"])
    kill = httpx.post(srv.base + "/v1/Task/Kill", headers={**headers, **srv.headers(p)}, content=kill_body.encode()).json()
    assert kill["errors"][0]["message"].startswith("Task could not be killed")  # already cancelled


def test_async_client_sees_flat_progress(server, project):
    """Easel's own asyncio client reads the frames it now gets (flat progress messages)."""
    from easel.client import AsyncClient

    async def go():
        client = AsyncClient(f"{server.base}/v1", project.apikey, project.apisecret)
        seen: list[dict] = []
        try:
            task = await client.run(TOOL, {**SMALL, "steps": 2}, wait=True, on_event=seen.append)
        finally:
            await client.aclose()
        return task, seen

    task, seen = asyncio.run(go())
    from easel.cli.follow import progress_of

    steps = [progress_of(f)["stepCurrent"] for f in seen if progress_of(f)]
    assert task["pexit"] == "0" and steps == ["1", "2"]
    assert progress_of({"type": "task_output", "message": {"type": "progressGenerate", "progressGenerate": {
        "stepCurrent": "1", "stepTotal": "2", "percentage": "50"}}})["stepCurrent"] == "1"  # older Easel servers


def test_the_python_client_speaks_to_wiro_itself():
    """``easel.client`` pointed at https://api.wiro.ai/v1 sends what Wiro's pages document (an
    offline check: the HTTP transport answers as Wiro's examples do; no request leaves the machine)."""
    from easel.client import Client, socket_url_for

    assert socket_url_for("https://api.wiro.ai/v1") == "wss://socket.wiro.ai/v1"
    assert socket_url_for("http://127.0.0.1:8000/v1") == "ws://127.0.0.1:8000/v1"
    sent: list[tuple[str, dict, dict]] = []
    statuses = iter(["task_start", "task_error"])  # Wiro's Detail may end a failed task as task_error

    def wiro(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.append((request.url.path, dict(request.headers), body))
        if request.url.path.startswith("/v1/Run/"):
            return httpx.Response(200, json=SEED_RUN)
        task = {**TASKS_MD_DETAIL["tasklist"][0], "status": next(statuses, "task_postprocess_end")}
        return httpx.Response(200, json={**TASKS_MD_DETAIL, "tasklist": [task]})

    client = Client("https://api.wiro.ai/v1", "key", "secret")
    client.http = httpx.Client(transport=httpx.MockTransport(wiro))
    assert client.socket_url == "wss://socket.wiro.ai/v1"
    assert client.run("Adel_AI/Comics-Factory-v1", {"prompt": "x"}) == SEED_RUN
    assert client.wait(SEED_RUN["taskid"], poll=0)["status"] == "task_error"
    client.delete(SEED_RUN["taskid"])
    path, headers, body = sent[0]
    assert path == "/v1/Run/Adel_AI/Comics-Factory-v1" and body == {"prompt": "x"}
    assert headers["x-signature"] == signature("key", "secret", headers["x-nonce"])
    assert [(p, b) for p, _, b in sent[1:]] == [("/v1/Task/Detail", {"taskid": "2221"})] * 3 + [
        ("/v1/Task/InputOutputDelete", {"tasktoken": TASKS_MD_DETAIL["tasklist"][0]["socketaccesstoken"]})]


def test_a_refused_run_keeps_none_of_its_uploads(server, project, tiny):
    uploads = server.data_dir / "uploads"
    before = set(uploads.iterdir()) if uploads.exists() else set()
    fields = {k: str(v) for k, v in SMALL.items() if k not in ("selectedLoraModel", "prompt")}
    with open(tiny["sd15-lora-kohya"], "rb") as fh:
        r = server.post(project, f"/v1/Run/{TOOL}", data={**fields, "prompt": " "},
                        files={"selectedLoraModelPrivateUrl": ("mine.safetensors", fh, "application/octet-stream")})
    assert r.json()["errors"] == [{"code": 0, "message": "Request parameter [prompt] required"}]
    assert (set(uploads.iterdir()) if uploads.exists() else set()) == before


def test_clean_slugs_nonce_kinds_and_documented_texts():
    from easel.api.auth import nonce_time
    from easel.api.errors import documented
    from easel.api.toolinfo import clean_slug

    assert [clean_slug(s) for s in ("Virtual Try-On", "Adel_AI", "Comics-Factory-v1", " x  y ")] == \
        ["virtual-try-on", "adel_ai", "comics-factory-v1", "x-y"]  # models.md's example, the seed's owner
    now = 1_800_000_000.0
    assert nonce_time("1800000000", 300, now) == now and nonce_time("1800000000123", 300, now) == now + 0.123
    assert nonce_time("1800000299", 300, now) == now + 299 and nonce_time("1800000301", 300, now) is None
    assert nonce_time("1600000000", 300, now) == 1.6e9  # a past Unix time: a (stale) timestamp
    for random_nonce in ("4242424242", str(1_800_000_000 * 10**9), "999999999", "7", "abc", ""):
        assert nonce_time(random_nonce, 300, now) is None, random_nonce
    assert documented("Request parameter [steps] must be between 1 and 150") == (
        "Request parameter [steps] must be between 1 and 150", "")
    assert documented("Request parameter [seed] must be integer or float (got 'x')") == (
        "Request parameter [seed] must be integer or float", "got 'x'")
    assert documented("Request parameter [width] must be a multiple of 8") == (
        "Request parameter [width] must be a multiple of 8", "")  # not a documented template: as is


def test_cli_sets_a_projects_nonce_policy(tmp_path):
    import subprocess
    import sys

    def easel(*args):
        return subprocess.run([sys.executable, "-m", "easel", "projects", *args, "--data-dir", str(tmp_path)],
                              capture_output=True, text=True, timeout=120)

    made = json.loads(easel("create", "x", "--json").stdout)
    assert made["nonce_policy"] == "lenient"
    assert json.loads(easel("create", "y", "--nonce-policy", "strict", "--json").stdout)["nonce_policy"] == "strict"
    assert "nonce policy strict" in easel("nonce-policy", made["apikey"], "strict").stdout
    from easel.config import Settings
    from easel.store import Store

    assert Store(Settings(data_dir=tmp_path).core.database_url).project_by_key(made["apikey"]).nonce_policy == "strict"
    assert easel("nonce-policy", "nope", "strict").returncode == 1
    assert easel("create", "z", "--nonce-policy", "loose").returncode != 0
