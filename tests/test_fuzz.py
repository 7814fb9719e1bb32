"""A bounded schemathesis pass over /openapi.json (every Task, Tool and Run endpoint, with their
request schemas): generated bodies, including hostile ones, never get a 5xx. In-process (ASGI),
API only (tasks stay queued), so it is fast."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from easel.api import create_app  # noqa: E402
from easel.config import Settings  # noqa: E402
from easel.store import Store  # noqa: E402

_DATA = Path(tempfile.mkdtemp(prefix="easel-fuzz-"))
_SETTINGS = Settings(data_dir=_DATA, request_max_bytes=1_000_000)
_STORE = Store(_SETTINGS.database_url)
_STORE.migrate()
_PROJECT = _STORE.create_project("fuzz", "apikey")
APP = create_app(_SETTINGS, None, dispatch_webhooks=False)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.include(path_regex=r"^/v1/(Task|Tool|Run)/").parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors(case):
    response = case.call(headers={"x-api-key": _PROJECT.apikey})
    assert response.status_code < 500, (case.path, case.body, response.text[:300])
