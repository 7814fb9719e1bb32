"""Hostile Run bodies (issue 21, items 4-6): numbers no answer can carry, fields with no length
cap, bodies larger than any Run needs, and webhooks that could never be delivered are refused
at Run with the field's name, and whatever Run stores reads back through Task/Detail, Task/List
and Task/Cancel. In-process (ASGI, API only: tasks stay queued), so it is fast; the streaming
of refused bodies is checked on :func:`parse_body` with an ASGI ``receive`` that counts what
it hands out."""
from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient
from starlette.requests import Request

from easel.api import create_app
from easel.api.errors import WiroError
from easel.api.parsing import MAX_TEXT_PART, parse_body
from easel.catalog import limits
from easel.config import Settings
from easel.store import Store
from easel.tasks import lifecycle as lc

SD = "/v1/Run/wiro/text-to-image-sd-lora"
SEED_SENTENCE = "You can provide a callback URL; Wiro will send a POST request to it when the task is completed."


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """(client, headers, store, project) of an in-process API without workers."""
    data = tmp_path_factory.mktemp("hostile")
    settings = Settings(data_dir=data)
    store = Store(settings.core.database_url)
    store.migrate()
    project = store.create_project("hostile", "apikey")
    with TestClient(create_app(settings, None, dispatch_webhooks=False)) as http:
        yield http, {"x-api-key": project.apikey}, store, project
    store.engine.dispose()


def run_raw(api, text: str, path: str = SD):
    http, headers, *_ = api
    return http.post(path, headers={**headers, "Content-Type": "application/json"}, content=text.encode())


def refused(r, field: str) -> str:
    """The error of a refused Run (HTTP 200 or 413, code 0), whose message or detail names ``field``."""
    assert r.status_code in (200, 413), r.text[:300]
    body = r.json()
    assert body["result"] is False, body
    error = body["errors"][0]
    text = f"{error['message']} {error.get('detail', '')}"
    assert error["code"] == 0 and f"[{field}]" in text, text[:300]
    return text


# -- item 4: numbers no answer can carry ---------------------------------------------------------


@pytest.mark.parametrize("field", ["prompt", "negativePrompt", "seed", "samples", "somethingElse"])
@pytest.mark.parametrize("number", ["1000000000000000000000000000000", "18446744073709551616",
                                    "9223372036854775808", "-9223372036854775809", "1e400", "NaN", "-Infinity"])
def test_a_number_no_answer_can_carry_is_refused_naming_the_field(api, field, number):
    body = '{"prompt": "a red fish", "samples": 1, "%s": %s}' % (field, number)
    text = refused(run_raw(api, body), field)
    assert "cannot store" in text or "must be" in text


def test_the_largest_storable_integers_round_trip(api):
    http, headers, *_ = api
    r = run_raw(api, '{"prompt": 9223372036854775807, "seed": -9223372036854775808, "extra": 18446744}')
    assert r.json()["result"] is True, r.text
    task = http.post("/v1/Task/Detail", headers=headers, json={"taskid": r.json()["taskid"]}).json()["tasklist"][0]
    assert task["parameters"]["prompt"] == 9223372036854775807 and task["parameters"]["seed"] == -2**63


def test_values_stored_before_the_checks_read_back_everywhere(api):
    """A task stored with numbers orjson cannot write (as Run stored them before this check)
    answers Detail, List, Cancel and Kill, the number written as a string."""
    http, headers, store, project = api
    task, _ = lc.submit(store, project_id=project.id, tool="wiro/text-to-image-sd-lora",
                        parameters={"prompt": 10**30, "seed": -(2**64), "nested": {"n": [2**70]}, "nan": float("nan")},
                        inputs={"prompt": str(10**30)}, callbackurl="", cost_per_second=0.0)
    detail = http.post("/v1/Task/Detail", headers=headers, json={"taskid": str(task.id)})
    assert detail.status_code == 200, detail.text[:300]
    params = detail.json()["tasklist"][0]["parameters"]
    assert params["prompt"] == str(10**30) and params["nested"] == {"n": [str(2**70)]} and params["nan"] is None
    listed = http.post("/v1/Task/List", headers=headers, json={"limit": "200"})
    assert listed.status_code == 200 and str(task.id) in [t["id"] for t in listed.json()["tasklist"]]
    cancel = http.post("/v1/Task/Cancel", headers=headers, json={"taskid": str(task.id)})
    assert cancel.status_code == 200 and cancel.json()["tasklist"][0]["status"] == "task_cancel"


@pytest.mark.parametrize("limit", ["9223372036854775808", "99999999999999999999999999999999999999"])
def test_task_list_with_an_enormous_limit_is_clamped(api, limit):
    http, headers, *_ = api
    for body in ('{"limit": "%s"}' % limit, '{"start": "%s"}' % limit):
        r = http.post("/v1/Task/List", headers={**headers, "Content-Type": "application/json"}, content=body.encode())
        assert r.status_code == 200 and r.json()["result"] is True, r.text[:300]
    r = http.post("/v1/Task/List", headers={**headers, "Content-Type": "application/json"},
                  content=('{"limit": %s}' % limit).encode())
    refused(r, "limit")


# -- item 5: length caps and body caps -----------------------------------------------------------


@pytest.mark.parametrize("field,cap", [("prompt", limits.PROMPT_CHARS), ("negativePrompt", limits.PROMPT_CHARS),
                                       ("selectedLoraModelPrivateUrl", limits.URL_CHARS),
                                       ("callbackUrl", limits.URL_CHARS), ("seed", limits.SHORT_CHARS),
                                       ("scheduler", limits.SHORT_CHARS), ("anotherField", limits.OTHER_CHARS)])
def test_every_text_field_has_a_cap_named_in_the_refusal(api, field, cap):
    http, headers, *_ = api
    prefix = "https://example.com/" if field.lower().endswith("url") else ""
    at_cap = {"prompt": "a red fish", "samples": 1, field: prefix + "a" * (cap - len(prefix))}
    if field in ("seed", "scheduler", "callbackUrl", "selectedLoraModelPrivateUrl"):
        pass  # only the length is checked here: the value itself may be refused later for what it is
    else:
        r = http.post(SD, headers=headers, json=at_cap)
        assert r.json()["result"] is True, r.text[:300]
    over = {**at_cap, field: at_cap[field] + "a"}
    text = refused(http.post(SD, headers=headers, json=over), field)
    assert f"at most {cap} characters" in text and f"got {cap + 1}" in text


def test_a_list_and_the_number_of_fields_are_capped(api):
    http, headers, *_ = api
    many = {"prompt": "x", **{f"f{i}": "1" for i in range(limits.MAX_FIELDS)}}
    r = http.post(SD, headers=headers, json=many)
    assert r.json()["result"] is False and f"at most {limits.MAX_FIELDS}" in r.json()["errors"][0]["detail"]
    refused(http.post(SD, headers=headers, json={"prompt": "x", "selectedLoraModel": ["61"] * 2000}),
            "selectedLoraModel")


def test_a_json_body_has_a_much_lower_cap_than_a_multipart_file(api):
    http, headers, *_ = api
    settings = Settings()
    assert settings.api.body_max_bytes * 64 <= settings.api.request_max_bytes
    big = json.dumps({"prompt": "x" * (settings.api.body_max_bytes + 10)})
    for ctype in ("application/json", "multipart/form-data"):  # the seeds send JSON as multipart/form-data
        r = http.post(SD, headers={**headers, "Content-Type": ctype}, content=big.encode())
        assert r.status_code == 413 and "EASEL_BODY_MAX_BYTES" in r.json()["errors"][0]["detail"], r.text[:300]
    # a file of the same size in a multipart body is within its own (much larger) cap
    r = http.post("/v1/File/Upload", headers=headers,
                  files={"file": ("big.bin", b"\0" * (settings.api.body_max_bytes + 10), "application/octet-stream")})
    assert r.status_code == 200, r.text[:300]


def _receive(chunks, size: int, handed: list):
    """An ASGI ``receive`` handing out ``chunks`` messages of ``size`` bytes (counted in ``handed``)."""
    async def receive():
        handed.append(1)
        n = len(handed)
        return {"type": "http.request", "body": chunks(n, size), "more_body": True}
    return receive


def _parse(ctype: str, chunks, size: int = 64 * 1024, **caps):
    handed: list = []
    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-type", ctype.encode())]}
    request = Request(scope, _receive(chunks, size, handed))
    with pytest.raises(WiroError) as err:
        asyncio.run(parse_body(request, **caps))
    return err.value, len(handed) * size


def test_a_refused_json_body_is_never_read_whole():
    endless = lambda n, size: (b'{"prompt": "' if n == 1 else b"") + b"x" * (size - (12 if n == 1 else 0))  # noqa: E731
    for ctype in ("application/json", "multipart/form-data; boundary=xyz", ""):
        err, read = _parse(ctype, endless, max_file_bytes=2**30, max_body_bytes=2**30, max_text_bytes=1024**2)
        assert err.status == 413 and read <= 1024**2 + 64 * 1024, (ctype, read)


def test_a_multipart_text_part_over_its_cap_is_refused_while_it_streams():
    head = b'--xyz\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n'
    endless = lambda n, size: head if n == 1 else b"x" * size  # noqa: E731
    err, read = _parse("multipart/form-data; boundary=xyz", endless, max_file_bytes=2**30, max_body_bytes=2**30,
                       max_text_bytes=1024**2)
    assert "limit of" in err.detail and read <= MAX_TEXT_PART + 2 * 64 * 1024


def test_a_multipart_body_over_the_request_cap_is_refused_while_it_streams():
    head = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    endless = lambda n, size: head if n == 1 else b"x" * size  # noqa: E731
    err, read = _parse("multipart/form-data; boundary=xyz", endless, max_file_bytes=1024**2,
                       max_body_bytes=4 * 1024**2, max_text_bytes=1024**2)
    assert err.status == 413 and "EASEL_REQUEST_MAX_BYTES" in err.detail and read <= 4 * 1024**2 + 64 * 1024


# -- item 6: callbackUrl ---------------------------------------------------------------------------


@pytest.mark.parametrize("url,why", [("http://127.0.0.1:9/hook", "loopback"), ("http://10.1.2.3/hook", "private"),
                                     ("http://169.254.169.254/latest", "link-local"), ("http://[::1]/x", "loopback"),
                                     ("ftp://example.com/hook", "only http(s)"), ("file:///etc/passwd", "only http(s)"),
                                     ("https:///nohost", "no host"), ("http://example.com:99999/x", "not a valid URL"),
                                     ("http://example.com/a\x00b", "control character")])
def test_a_callback_url_that_would_never_be_delivered_is_refused(api, url, why):
    http, headers, *_ = api
    text = refused(http.post(SD, headers=headers, json={"prompt": "x", "samples": 1, "callbackUrl": url}),
                   "callbackUrl")
    assert why in text


def test_the_seeds_sentence_and_allowed_hosts_are_accepted(api, tmp_path):
    http, headers, store, _ = api
    r = http.post(SD, headers=headers, json={"prompt": "x", "callbackUrl": SEED_SENTENCE})
    assert r.json()["result"] is True and store.get_task(int(r.json()["taskid"])).callbackurl == ""
    settings = Settings(data_dir=tmp_path, fetch_allow=("127.0.0.1",))
    local = Store(settings.core.database_url)
    local.migrate()
    p = local.create_project("allow", "apikey")
    with TestClient(create_app(settings, None, dispatch_webhooks=False)) as client:
        r = client.post(SD, headers={"x-api-key": p.apikey}, json={"prompt": "x", "callbackUrl": "http://127.0.0.1:9/h"})
        assert r.json()["result"] is True, r.text
        assert local.get_task(int(r.json()["taskid"])).callbackurl == "http://127.0.0.1:9/h"
    local.engine.dispose()
