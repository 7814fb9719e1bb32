"""Hostile and malformed requests get clear code-0 errors, never a 500: one strict parser for
numbers, ids and headers, valid Unicode, bounded nesting, a body cap, http(s)-only URLs, and no
files left behind by a refused Run. Runs against an API-only server (no workers: fast)."""
from __future__ import annotations

import json
import time

import httpx
import pytest

from conftest import SMALL, TOOL, Server
from easel.signing import signature
from easel.tasks import lifecycle as lc

CAP = 200_000


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("hygiene"), extra_args=("--workers", "0"),
                 env={"EASEL_REQUEST_MAX_BYTES": str(CAP)}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def proj(api):
    return api.project()


def _error(r: httpx.Response, status: int = 200) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["result"] is False and body["errors"][0]["code"] == 0, body
    error = body["errors"][0]  # Wiro's documented text, and Easel's explanation in "detail"
    return f"{error['message']} {error.get('detail', '')}"


def _raw(api, proj, path, content: bytes, ctype="application/json"):
    return api.post(proj, path, content=content, headers={"content-type": ctype})


@pytest.mark.parametrize("taskid", ["²", "1" * 30, "٣", "-1", "1e3"])
def test_bad_task_ids_are_code_0_errors(api, proj, taskid):
    assert "[taskid]" in _error(api.post(proj, "/v1/Task/Detail", json={"taskid": taskid}))


@pytest.mark.parametrize("field,value", [("limit", "²"), ("start", "9" * 5000), ("limit", "1_0"), ("start", [1])])
def test_bad_list_bounds_are_code_0_errors(api, proj, field, value):
    assert f"[{field}]" in _error(api.post(proj, "/v1/Task/List", json={field: value}))


def test_numbers_with_hundreds_of_digits_are_refused_naming_the_field(api, proj):
    assert "[samples]" in _error(api.post(proj, f"/v1/Run/{TOOL}", json={**SMALL, "samples": 10**400}))
    assert "[steps]" in _error(api.post(proj, f"/v1/Run/{TOOL}", json={**SMALL, "steps": "9" * 400}))
    assert "[width]" in _error(api.post(proj, f"/v1/Run/{TOOL}", json={**SMALL, "width": "６４"}))


@pytest.mark.parametrize("nonce", ["²".encode("latin-1"), b"1" * 5000])
def test_hostile_nonces_are_401_code_0(api, proj, nonce):
    text = nonce.decode("latin-1")
    headers = {"x-api-key": proj.apikey, "x-nonce": nonce,
               "x-signature": signature(proj.apikey, proj.apisecret, text)}
    r = httpx.post(f"{api.base}/v1/Tool/List", json={}, headers=headers, timeout=30)
    assert "x-nonce" in _error(r, 401)


def test_lone_surrogate_is_refused_at_run_naming_the_field(api, proj):
    body = json.dumps({**SMALL, "prompt": "PLACEHOLDER"}).replace("PLACEHOLDER", "x\\ud800y").encode()
    message = _error(_raw(api, proj, f"/v1/Run/{TOOL}", body))
    assert "[prompt]" in message and "surrogate" in message


def test_stored_invalid_text_never_breaks_detail_or_list(api, proj):
    """A task stored before Run refused lone surrogates: Task/Detail and Task/List still answer."""
    task, _ = lc.submit(api.store, project_id=proj.id, tool=TOOL, parameters={"prompt": "x\ud800y"},
                        inputs={"prompt": "x\ud800y"}, callbackurl="", cost_per_second=0)
    detail = api.detail(proj, str(task.id))
    assert detail["parameters"]["prompt"] == "x\ufffdy"
    listed = api.post(proj, "/v1/Task/List", json={}).json()
    assert listed["result"] and str(task.id) in [t["id"] for t in listed["tasklist"]]


def test_deeply_nested_json_is_refused(api, proj):
    deep = b'{"prompt": ' + b"[" * 60_000 + b"]" * 60_000 + b"}"
    assert "nested" in _error(_raw(api, proj, f"/v1/Run/{TOOL}", deep))
    assert "nested" in _error(_raw(api, proj, "/v1/Task/List", b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}"))


def test_a_missing_body_is_an_error(api, proj):
    assert "no body" in _error(_raw(api, proj, f"/v1/Run/{TOOL}", b""))
    assert "no body" in _error(_raw(api, proj, "/v1/Task/Detail", b"", ctype=""))


@pytest.mark.parametrize("url", ["file:///etc/passwd", "gopher://127.0.0.1:70/x", "example.com/lora.safetensors",
                                 "http:///nohost"])
def test_only_http_urls_are_accepted_at_run(api, proj, url):
    message = _error(api.post(proj, f"/v1/Run/{TOOL}", json={**SMALL, "selectedLoraModelPrivateUrl": url}))
    assert "[selectedLoraModelPrivateUrl]" in message and "http" in message


def test_a_body_over_the_cap_is_413_and_not_buffered(api, proj):
    r = api.post(proj, f"/v1/Run/{TOOL}", files={"selectedLoraModelPrivateUrl": ("x.safetensors", b"\0" * (CAP + 1))},
                 data={"prompt": "x"})
    assert "larger than" in _error(r, 413)

    def chunks(head: bytes = b'{"prompt": "'):  # no Content-Length: refused while streaming
        yield head
        for _ in range(100):
            yield b"x" * 10_000

    r = api.post(proj, f"/v1/Run/{TOOL}", content=chunks(), headers={"content-type": "application/json"})
    assert "larger than" in _error(r, 413)
    # a body that is neither JSON nor a form is refused from its first bytes, before the rest is read
    r = api.post(proj, f"/v1/Run/{TOOL}", content=chunks(b"\0"), headers={"content-type": "application/octet-stream"})
    assert "Send application/json" in r.json()["errors"][0]["detail"]


def test_uploads_of_a_refused_run_are_removed(api, proj):
    before = set((api.data_dir / "uploads").glob("*")) if (api.data_dir / "uploads").exists() else set()
    r = api.post(proj, f"/v1/Run/{TOOL}", files={"selectedLoraModelPrivateUrl": ("l.safetensors", b"\0" * 1000)},
                 data={**{k: str(v) for k, v in SMALL.items() if k != "selectedLoraModel"}, "steps": "many"})
    assert "[steps]" in _error(r)
    time.sleep(0.1)
    after = set((api.data_dir / "uploads").glob("*")) if (api.data_dir / "uploads").exists() else set()
    assert after == before
