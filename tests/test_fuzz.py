"""A bounded schemathesis pass over /openapi.json (every Task, Tool and Run endpoint, with their
request schemas): generated bodies, including hostile ones, never get a 5xx; and a table of
hostile values (huge integers, floats, NaN, Infinity, nested objects, long strings, lone
surrogates, control characters) sent through Run into every input of every tool, then every
stored task read back through Task/List and Task/Detail. In-process (ASGI), API only (tasks stay
queued), so it is fast."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from easel.api import create_app  # noqa: E402
from easel.config import Settings  # noqa: E402
from easel.store import Store  # noqa: E402

_DATA = Path(tempfile.mkdtemp(prefix="easel-fuzz-"))
# The schema's examples carry callbackUrl "https://0.com": a Run waits up to min(5 s, the webhook
# timeout) to resolve its host (once a minute per host), and a resolver here may not answer at all
_SETTINGS = Settings(data_dir=_DATA, request_max_bytes=1_000_000, webhook_timeout=0.2)
_STORE = Store(_SETTINGS.core.database_url)
_STORE.migrate()
_PROJECT = _STORE.create_project("fuzz", "apikey")
APP = create_app(_SETTINGS, None, dispatch_webhooks=False)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.include(path_regex=r"^/v1/(Task|Tool|Run)/").parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors(case):
    response = case.call(headers={"x-api-key": _PROJECT.apikey})
    assert response.status_code < 500, (case.path, case.body, response.text[:300])


# -- a table of hostile values through Run into every input, then read back --------------------------

# raw JSON values (what a client can put on the wire, Python's extensions included)
HOSTILE = [
    "18446744073709551616", "-18446744073709551617", "1" + "0" * 30, "9223372036854775807", "-9223372036854775808",
    "1.7976931348623157e308", "1e400", "-1e400", "5e-324", "NaN", "Infinity", "-Infinity", "0.1", "-0", "-1", "0",
    "true", "false", "null", '{"a": {"b": [1, {"c": null}]}}', "[[[[1]]]]", "[]", "{}", '["61", 62, null]',
    '"' + "x" * 20000 + '"', '"\\ud800"', '"a\\udfffb"', '"\\u0000\\u0001\\u001f\\u007f\\u2028\\u2029"',
    '"\\uffff\\ufffe"', '"<script>alert(1)</script>"', '"   "', '"\\u0661\\u0662\\u0663"', '"\\u00b2"', '"1_000"',
    '"0x10"', '"1e400"', '"NaN"', '"-Infinity"', '"' + "9" * 5000 + '"', '"\\ud83d\\ude00"',
    '"http://example.com/a\\u0000b"', '"http://[::1"', '"http://127.0.0.1:0/"', '"javascript:alert(1)"',
    '"https://example.com/' + "a" * 9000 + '"',
]


# raw bytes of a multipart text part: invalid UTF-8, an encoded surrogate, NUL, over the part cap
RAW_PARTS = [b"\xff\xfe\xfd", b"\xed\xa0\x80", b"a\x00b\x1b[31m", b"\xc0\xaf", b"x" * 70000, b"9" * 30]


def _fields() -> list[tuple[str, str, dict]]:
    """(tool path, field, base body) for every input of every runnable tool (each name once) and a
    field no tool has; the base body holds what the tool requires (image inputs: a remote URL,
    which Run does not fetch)."""
    from easel.catalog import load_tools

    seen, out = set(), []
    for spec in load_tools().values():
        if not spec.module:
            continue
        base = {"prompt": "a fish", **{i.name: "https://example.com/a.png" for i in spec.inputs if i.accepts == "image"}}
        for name in [i.name for i in spec.inputs] + ["notAnInput", "callbackUrl"]:
            if name not in seen:
                seen.add(name)
                out.append((f"/v1/Run/{spec.owner}/{spec.slug}", name, base))
    return out


def test_hostile_values_in_every_field_store_and_read_back():
    from fastapi.testclient import TestClient

    headers = {"x-api-key": _PROJECT.apikey, "Content-Type": "application/json"}
    stored, statuses = [], set()
    with TestClient(APP) as http:
        for path, field, base in _fields():
            for value in HOSTILE:
                text = json.dumps({k: v for k, v in base.items() if k != field})[:-1] + f', "{field}": {value}}}'
                r = http.post(path, headers=headers, content=text.encode())
                assert r.status_code < 500, (path, field, value[:40], r.text[:300])
                statuses.add(r.status_code)
                if r.json().get("result"):
                    stored.append(r.json()["taskid"])
            for raw in RAW_PARTS:  # the same field as a multipart text part of raw bytes
                parts = {k: (None, str(v).encode()) for k, v in base.items() if k != field}
                r = http.post(path, headers={"x-api-key": _PROJECT.apikey}, files={**parts, field: (None, raw)})
                assert r.status_code < 500, (path, field, raw[:40], r.text[:300])
                statuses.add(r.status_code)
                if r.json().get("result"):
                    stored.append(r.json()["taskid"])
        assert len(stored) > 100 and statuses <= {200, 413}, (len(stored), statuses)
        listed, start = set(), 0
        while True:
            page = http.post("/v1/Task/List", headers=headers, json={"start": str(start), "limit": "200"})
            assert page.status_code == 200 and page.json()["result"], page.text[:300]
            items = page.json()["tasklist"]
            listed |= {t["id"] for t in items}
            if len(items) < 200:
                break
            start += 200
        assert set(stored) <= listed
        for taskid in stored:
            r = http.post("/v1/Task/Detail", headers=headers, json={"taskid": taskid})
            assert r.status_code == 200 and r.json()["result"], (taskid, r.text[:300])
            json.loads(r.text, parse_constant=lambda c: pytest.fail(f"{c} in an answer: not JSON"))
