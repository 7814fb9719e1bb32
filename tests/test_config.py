"""Configuration (pydantic-settings: file < environment < flags given), every setting read, API
keys stored hashed, and owner-only permissions on the data directory and database."""
from __future__ import annotations

import dataclasses
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import free_port
from easel.config import Settings
from easel.store import Store

ROOT = Path(__file__).parent.parent


def test_precedence_file_then_environment_then_flags(tmp_path, monkeypatch):
    cfg = tmp_path / "easel.toml"
    cfg.write_text('workers = 4\nwebhook_timeout = 3.5\nfetch_allow = ["10.0.0.0/8"]\nmodel_source = "hub"\n')
    monkeypatch.setenv("EASEL_WORKERS", "2")
    s = Settings.from_env(cfg, data_dir=tmp_path, model_source=None)
    assert (s.worker.workers, s.api.webhook_timeout, s.fetch.fetch_allow, s.weights.model_source) == (2, 3.5, ("10.0.0.0/8",), "hub")
    assert Settings.from_env(cfg, data_dir=tmp_path, workers=0).worker.workers == 0  # a flag that was given wins
    monkeypatch.setenv("EASEL_CONFIG_FILE", str(cfg))
    assert Settings.from_env(data_dir=tmp_path).api.webhook_timeout == 3.5
    cfg.write_text("no_such_setting = 1\n")
    with pytest.raises(ValueError, match="(?i)no_such_setting"):
        Settings.from_env(cfg)
    monkeypatch.setenv("EASEL_LEASE_SECONDS", "soon")
    with pytest.raises(ValueError, match="EASEL_LEASE_SECONDS"):
        Settings.from_env(data_dir=tmp_path)


def test_every_setting_is_read_somewhere():
    """Every field of every section is read outside ``easel/config/`` (from the whole settings or
    from the section a component was handed)."""
    from easel.config import FIELD_SECTION

    config = ROOT / "easel" / "config"
    code = "\n".join(p.read_text() for p in (ROOT / "easel").rglob("*.py") if config not in p.parents)
    unread = [f"{section}.{name}" for name, section in FIELD_SECTION.items() if not re.search(rf"\.{name}\b", code)]
    assert unread == []


def test_settings_take_flat_names_route_them_to_sections_and_pickle(tmp_path):
    import pickle

    from easel.config import ApiSettings, StorageSettings

    s = Settings(data_dir=tmp_path, workers=2, storage="s3://my-bucket/p", cors_origins=("*",))
    assert (s.worker.workers, s.storage.storage, s.api.cors_origins) == (2, "s3://my-bucket/p", ("*",))
    assert s.core.database_url == f"sqlite:///{tmp_path.resolve() / 'easel.db'}"
    assert pickle.loads(pickle.dumps(s)) == s
    changed = s.with_(workers=0, storage=StorageSettings(), api_threads=3)
    assert (changed.worker.workers, changed.storage.storage, changed.api.api_threads) == (0, "local", 3)
    assert changed.api.cors_origins == ("*",) and s.worker.workers == 2  # the rest kept, the original unchanged
    assert Settings(api=ApiSettings(api_threads=5), rate_limit_per_minute=7).api.api_threads == 5
    with pytest.raises(TypeError, match="no_such_setting"):
        Settings(no_such_setting=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.worker.workers = 3


def test_config_file_may_group_settings_in_section_tables(tmp_path):
    cfg = tmp_path / "easel.toml"
    cfg.write_text('storage = "s3://my-bucket/p"\n[worker]\nworkers = 3\n[api]\nws_path = "/ws"\n')
    s = Settings.from_env(cfg, data_dir=tmp_path)
    assert (s.worker.workers, s.api.ws_path, s.storage.storage) == (3, "/ws", "s3://my-bucket/p")
    cfg.write_text('[api]\nworkers = 3\n')
    with pytest.raises(ValueError, match="\\[api\\] has no setting 'workers'"):
        Settings.from_env(cfg, data_dir=tmp_path)


def test_config_imports_neither_catalog_store_nor_torch():
    code = "import sys, easel.config; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' " \
           "or m.startswith(('easel.catalog', 'easel.store'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_serve_takes_data_dir_workers_and_model_source_from_the_environment(tmp_path):
    """`easel serve` without those flags used to ignore EASEL_DATA_DIR, EASEL_WORKERS and
    EASEL_MODEL_SOURCE (its option defaults always won)."""
    data = tmp_path / "from-env"
    port = free_port()
    env = {**os.environ, "EASEL_DATA_DIR": str(data), "EASEL_WORKERS": "0", "EASEL_MODEL_SOURCE": "hub",
           "EASEL_PUBLIC_URL": "https://images.example"}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "easel", "serve", "--port", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        health = None
        while time.time() < deadline and health is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).json()
            except httpx.HTTPError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                time.sleep(0.2)
        assert health == {"ok": True, "reason": "API only (no local workers)"}
        assert (data / "easel.db").exists()
        p = Store(Settings(data_dir=data).core.database_url).create_project("env", "apikey")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/Run/Adel_AI/Comics-Factory-v1", headers={"x-api-key": p.apikey},
                       json={"prompt": "a cat"}, timeout=30).json()
        assert r["result"] is False and "cannot run on this server" in r["errors"][0]["message"]  # hub mode
    finally:
        proc.terminate()
        proc.wait(20)


def test_api_keys_are_stored_hashed_and_files_are_owner_only(tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    store = Store(settings.core.database_url)
    store.migrate()
    p = store.create_project("x")
    stored = store.project_by_id(p.id).apikey
    assert stored.startswith("sha256:") and p.apikey not in stored
    assert store.project_by_key(p.apikey).id == p.id and store.project_by_key(stored) is None
    assert stat.S_IMODE(os.stat(settings.core.data_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(settings.core.data_dir / "easel.db").st_mode) == 0o600
    store.engine.dispose()


def test_a_setting_of_the_wrong_type_in_the_environment_is_a_usage_error_naming_it(tmp_path):
    """``easel serve`` and ``easel worker`` with a bad ``EASEL_*`` value: exit 2 and the
    variable's name, no traceback."""
    import os
    import subprocess
    import sys

    for command in (["serve", "--port", "0"], ["worker"]):
        env = {**os.environ, "EASEL_DEVICE_MEMORY_HEADROOM_BYTES": "lots"}
        out = subprocess.run([sys.executable, "-m", "easel", *command, "--data-dir", str(tmp_path)],
                             capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 2, out.stderr
        assert "EASEL_DEVICE_MEMORY_HEADROOM_BYTES" in out.stderr and "Traceback" not in out.stderr


def test_serve_and_worker_refuse_what_other_modules_check_at_start(tmp_path):
    """The live-push backend (``easel.store.notify.check_live``) and a worker's queues
    (``easel.executors.celery.check_queues``) are checked where they are used, yet ``easel serve``
    and ``easel worker`` still refuse a bad value at start: exit 2, the setting named, no traceback."""
    cases = [(["serve", "--port", "0"], {"EASEL_LIVE_PUSH": "kafka"}, "EASEL_LIVE_PUSH must be one of"),
             (["worker"], {"EASEL_LIVE_PUSH": "redis"}, "EASEL_LIVE_PUSH=redis needs EASEL_REDIS_URL"),
             (["worker"], {"EASEL_QUEUES": "sd15,sd3"}, "queues must be among")]
    for command, extra, message in cases:
        env = {**os.environ, **extra}
        out = subprocess.run([sys.executable, "-m", "easel", *command, "--data-dir", str(tmp_path)],
                             capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 2, (command, out.stderr)
        assert message in " ".join(out.stderr.split()) and "Traceback" not in out.stderr, out.stderr


def test_every_section_documents_its_own_fields():
    from easel.config import SECTIONS

    undocumented = [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)
                    if not re.search(rf"\b{f.name}\b", cls.__doc__ or "")]
    assert undocumented == []
