"""Authentication, isolation and validation errors answer with Wiro's documented envelope."""
from __future__ import annotations

import httpx

from conftest import SMALL, TOOL
from easel.signing import signature


def err(r: httpx.Response) -> tuple[int, int, str]:
    body = r.json()
    assert body["result"] is False
    return r.status_code, body["errors"][0]["code"], body["errors"][0]["message"]


def test_bad_signature(server, project):
    r = httpx.post(f"{server.base}/v1/Run/{TOOL}", json=SMALL,
                   headers={"x-api-key": project.apikey, "x-nonce": "12345", "x-signature": "00" * 32})
    assert err(r) == (401, 0, "Project authorization is not valid.")


def test_missing_signature_and_unknown_key(server, project):
    r = httpx.post(f"{server.base}/v1/Run/{TOOL}", json=SMALL, headers={"x-api-key": project.apikey})
    assert err(r)[:2] == (401, 0) and "x-signature and x-nonce" in err(r)[2]
    r = httpx.post(f"{server.base}/v1/Run/{TOOL}", json=SMALL, headers={"x-api-key": "nope"})
    assert err(r) == (401, 0, "Project authorization is not founded.")


def test_replayed_nonce_is_refused_under_the_strict_policy(server):
    project = server.project(nonce_policy="strict")
    headers = server.headers(project, nonce="424242")
    first = httpx.post(f"{server.base}/v1/Task/Detail", json={"taskid": "999999"}, headers=headers)
    assert err(first)[:2] == (200, 1)  # authenticated; no such task
    again = httpx.post(f"{server.base}/v1/Task/Detail", json={"taskid": "999999"}, headers=headers)
    assert err(again) == (401, 0, "Project authorization is not valid.")
    assert "already used" in again.json()["errors"][0]["detail"]


def test_stale_timestamp_nonce_is_refused_under_the_strict_policy(server, project):
    nonce = "1600000000"
    answers = []
    for p in (server.project(nonce_policy="strict"), project):  # the session's project is lenient: any nonce
        headers = {"x-api-key": p.apikey, "x-nonce": nonce, "x-signature": signature(p.apikey, p.apisecret, nonce)}
        answers.append(httpx.post(f"{server.base}/v1/Task/Detail", json={"taskid": "1"}, headers=headers))
    strict, lenient = answers
    assert err(strict) == (401, 0, "Project authorization is not valid.")
    assert "within 300 s" in strict.json()["errors"][0]["detail"]
    assert lenient.status_code == 200


def test_apikey_only_project(server):
    p = server.project("apikey")
    r = httpx.post(f"{server.base}/v1/Run/{TOOL}", json=SMALL, headers={"x-api-key": p.apikey})
    assert r.json()["result"] is True


def test_other_projects_task_is_not_visible(server, project):
    mine = server.run(project, SMALL)["taskid"]
    other = server.project()
    for path in ("/v1/Task/Detail", "/v1/Task/Cancel", "/v1/Task/Kill"):
        r = server.post(other, path, json={"taskid": mine})
        assert err(r) == (200, 0, "You don't have any permission for this action."), path
    token = server.detail(project, mine)["socketaccesstoken"]
    r = server.post(other, "/v1/Task/Detail", json={"tasktoken": token})
    assert err(r)[1] == 0


def test_unknown_task_and_missing_identifier(server, project):
    assert err(server.post(project, "/v1/Task/Detail", json={"taskid": "987654"})) == (200, 1, "There is no task yet.")
    assert err(server.post(project, "/v1/Task/Detail", json={})) == (200, 0, "taskid or socketaccesstoken is required")


def test_unknown_tool_and_unknown_endpoint(server, project):
    assert err(server.post(project, "/v1/Run/nobody/nothing", json=SMALL)) == (200, 1, "slug-owner-project-not-exist")
    assert err(httpx.post(f"{server.base}/v1/Nope")) == (404, 0, "Error parsing url.")
    assert err(httpx.get(f"{server.base}/v1/Run/wiro/x")) == (404, 0, "Error parsing url.")


def test_validation_errors_name_the_field_and_what_it_accepts(server, project):
    cases = [
        ({"steps": "many"}, "Request parameter [steps] must be integer or float"),
        ({"steps": 1000}, "Request parameter [steps] must be between 1 and 150"),
        ({"samples": 2.5}, "Request parameter [samples] must be an integer"),
        ({"width": 100}, "Request parameter [width] must be a multiple of 8"),
        ({"selectedModel": "99999"}, "Request parameter [selectedModel] must be one of: 482, 1087"),
        ({"selectedLoraModel": ["61", "4242"]}, "Request parameter [selectedLoraModel] values must be among"),
        ({"scheduler": "Magic"}, "Request parameter [scheduler] must be one of: EulerDiscreteScheduler"),
        ({"selectedLoraModel": ["61"], "Fish-out-of-Water-v1.0": "3"},
         "Request parameter [Fish-out-of-Water-v1.0] must be between 0 and 1"),
    ]
    for extra, message in cases:
        status, code, text = err(server.post(project, f"/v1/Run/{TOOL}", json={**SMALL, **extra}))
        assert (status, code) == (200, 0) and text.startswith(message), (extra, text)


def test_invalid_body_is_a_clear_error(server, project):
    r = server.post(project, f"/v1/Run/{TOOL}", content=b"{not json", headers={"Content-Type": "application/json"})
    assert err(r) == (200, 0, "Request parameters are invalid.") and r.json()["errors"][0]["detail"]


def test_hub_mode_refuses_a_preset_whose_weights_are_unknown(tmp_path):
    from fastapi.testclient import TestClient

    from easel.api import create_app
    from easel.config import Settings
    from easel.store import Store

    settings = Settings(data_dir=tmp_path, model_source="hub")
    store = Store(settings.core.database_url)
    store.migrate()
    p = store.create_project("hub", "apikey")
    with TestClient(create_app(settings, None, dispatch_webhooks=False)) as http:
        comics = http.post("/v1/Run/Adel_AI/Comics-Factory-v1", headers={"x-api-key": p.apikey},
                           json={"prompt": "ComicsFact1 style. a cat"}).json()
        assert comics["result"] is False and comics["errors"][0]["code"] == 0
        message = comics["errors"][0]["message"]
        assert message.startswith("Adel_AI/Comics-Factory-v1 cannot run on this server: Model comics-factory-v1")
        assert "catalog.override.json" in message
        flux = http.post("/v1/Run/wiro/text-to-image-flux-lora-fast", headers={"x-api-key": p.apikey},
                         json={"prompt": "a lion"}).json()
        assert flux["result"] is False  # FLUX.1-dev has a public source, under a licence not accepted yet
        message = flux["errors"][0]["message"]
        assert "flux-1-dev-non-commercial-license" in message and "EASEL_ACCEPT_LICENSES=flux.1-dev" in message
    accepted = Settings(data_dir=tmp_path, model_source="hub", accept_licenses=("flux.1-dev",))
    with TestClient(create_app(accepted, None, dispatch_webhooks=False)) as http:
        flux = http.post("/v1/Run/wiro/text-to-image-flux-lora-fast", headers={"x-api-key": p.apikey},
                         json={"prompt": "a lion"}).json()
        assert flux["result"] is True, flux  # accepted: FLUX.1-dev has a public source
