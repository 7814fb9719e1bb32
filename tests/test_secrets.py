"""API secrets at rest (issue 21, item 9): sealed with the operator key (easel.store.secretbox), a
clear secret of an older version sealed by migration 0008 and still signing, rotation that keeps
every signature working (a running server follows the key file), and a wrong key that stops the
server at start with a clear message."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest
from cryptography.fernet import Fernet

from conftest import Server
from easel.config import Settings
from easel.signing import signature
from easel.store import SecretBox, SecretKeyError, Store, hash_apikey
from easel.store.secretbox import KEY_FILE


@pytest.fixture(autouse=True)
def _no_session_key(monkeypatch):
    """These tests choose their keys: the session's EASEL_SECRET_KEY (conftest) is not theirs."""
    monkeypatch.delenv("EASEL_SECRET_KEY", raising=False)


def _stored(db, project_id: int) -> str:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT apisecret FROM projects WHERE id = ?", (project_id,)).fetchone()[0]


def _list(server: Server, apikey: str, secret: str) -> httpx.Response:
    nonce = str(time.time_ns())
    return httpx.post(f"{server.base}/v1/Task/List", json={}, timeout=30,
                      headers={"x-api-key": apikey, "x-nonce": nonce, "x-signature": signature(apikey, secret, nonce)})


def test_a_stored_secret_is_not_in_clear_anywhere_in_the_database_files(tmp_path):
    settings = Settings(data_dir=tmp_path)
    store = Store(settings.core.database_url, secrets=SecretBox.for_settings(settings.core))
    store.migrate()
    made = store.create_project("p")
    assert (tmp_path / KEY_FILE).stat().st_mode & 0o777 == 0o600  # created at first start, owner only
    store.checkpoint()
    store.engine.dispose()
    raw = b"".join(f.read_bytes() for f in tmp_path.glob("easel.db*"))
    assert made.apisecret.encode() not in raw
    assert _stored(tmp_path / "easel.db", made.id).startswith("fernet:")
    # a store opened by URL alone finds the key file next to the database, and opens the secret
    assert Store(settings.core.database_url).project_by_key(made.apikey).apisecret == made.apisecret


def test_rotation_with_environment_keys_and_a_wrong_key(tmp_path):
    """EASEL_SECRET_KEY=NEW,OLD opens both and rotation seals with NEW; then NEW alone opens
    every secret, and OLD alone is refused by migrate (a process's start) naming the source."""
    url = Settings(data_dir=tmp_path).core.database_url
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    first = Store(url, secrets=SecretBox(old, "EASEL_SECRET_KEY"))
    first.migrate()
    made = first.create_project("p")
    both = Store(url, secrets=SecretBox(f"{new},{old}", "EASEL_SECRET_KEY"))
    assert both.rotate_secrets() == 1
    assert Store(url, secrets=SecretBox(new, "EASEL_SECRET_KEY")).project_by_key(made.apikey).apisecret == made.apisecret
    with pytest.raises(SecretKeyError, match=r"1 project\(s\)' API secrets do not open with the key\(s\) of "
                                             r"EASEL_SECRET_KEY"):
        Store(url, secrets=SecretBox(old, "EASEL_SECRET_KEY")).migrate()
    with pytest.raises(SecretKeyError, match="key 1 is not a Fernet key"):
        SecretBox("not-a-key", "EASEL_SECRET_KEY")


def test_clear_secrets_are_sealed_on_upgrade_and_rotation_keeps_every_signature_working(tmp_path):
    from alembic import command
    from alembic.config import Config

    import easel.store as store_pkg

    data = tmp_path / "data"
    data.mkdir()
    url = Settings(data_dir=data).core.database_url
    # the database as version 0007 left it: a project whose secret is stored in clear
    cfg = Config(str(store_pkg.HERE / "alembic.ini"))
    cfg.set_main_option("script_location", str(store_pkg.HERE / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url)
    command.upgrade(cfg, "0007_queue_seq_previews")
    apikey, secret = "k" * 32, "s" * 48
    with sqlite3.connect(data / "easel.db") as conn:
        conn.execute("INSERT INTO projects (id, name, apikey, apisecret, auth_mode, nonce_policy, created_at, "
                     "task_count) VALUES (7, 'old', ?, ?, 'signature', 'lenient', 0, 0)", (hash_apikey(apikey), secret))
    assert not (data / KEY_FILE).exists()

    server = Server(data).start()  # migrates to 0008: the key file is made and the secret sealed
    try:
        sealed = _stored(data / "easel.db", 7)
        assert sealed.startswith("fernet:") and secret not in sealed
        key_before = (data / KEY_FILE).read_text()
        assert _list(server, apikey, secret).json()["result"] is True
        assert _list(server, apikey, "x" * 48).status_code == 401  # the HMAC is still checked

        env = {k: v for k, v in os.environ.items() if k != "EASEL_SECRET_KEY"}
        rotated = subprocess.run([sys.executable, "-m", "easel", "projects", "rotate-key", "--new", "--drop-old",
                                  "--data-dir", str(data)], env=env, capture_output=True, text=True, timeout=120)
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
        assert "1 API secret(s) re-encrypted" in rotated.stdout and "1 old key(s) removed" in rotated.stdout
        key_after = (data / KEY_FILE).read_text()
        assert key_after != key_before and len(key_after.split()) == 1
        assert _stored(data / "easel.db", 7) != sealed
        time.sleep(1.2)  # past the auth cache: the running server reads the project again, with the new key
        assert _list(server, apikey, secret).json()["result"] is True
        made = Store(url).create_project("new")  # a project made after the rotation signs too
        assert _list(server, made.apikey, made.apisecret).json()["result"] is True
    finally:
        server.stop()

    # a wrong key: the server does not start, and says why
    wrong = {**env, "EASEL_SECRET_KEY": Fernet.generate_key().decode()}
    run = subprocess.run([sys.executable, "-m", "easel", "serve", "--port", "9", "--data-dir", str(data),
                          "--model-source", "tiny"], env=wrong, capture_output=True, text=True, timeout=120)
    out = run.stdout + run.stderr
    assert run.returncode == 2, out
    assert "API secrets: 2 project(s)' API secrets do not open with the key(s) of EASEL_SECRET_KEY" in out, out
    assert "Traceback" not in out


def test_on_postgresql_the_migration_widens_the_column_and_seals_clear_secrets():
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    import easel.store as store_pkg
    from pg import create_database

    url, drop = create_database()
    try:
        cfg = Config(str(store_pkg.HERE / "alembic.ini"))
        cfg.set_main_option("script_location", str(store_pkg.HERE / "migrations"))
        cfg.set_main_option("sqlalchemy.url", url)
        command.upgrade(cfg, "0007_queue_seq_previews")
        box = SecretBox(Fernet.generate_key().decode(), "EASEL_SECRET_KEY")
        store = Store(url, secrets=box)
        with store.engine.begin() as conn:
            conn.execute(text("INSERT INTO projects (name, apikey, apisecret, auth_mode, nonce_policy, created_at, "
                              "task_count) VALUES ('old', :k, :s, 'signature', 'lenient', 0, 0)"),
                         {"k": hash_apikey("k" * 32), "s": "s" * 48})
        store.migrate()
        assert store.project_by_key("k" * 32).apisecret == "s" * 48
        made = store.create_project("new")  # a sealed secret (171 characters) fits the widened column
        with store.engine.connect() as conn:
            stored = [r[0] for r in conn.execute(text("SELECT apisecret FROM projects ORDER BY id"))]
        assert all(s.startswith("fernet:") and "s" * 48 not in s and made.apisecret not in s for s in stored)
        store.engine.dispose()
    finally:
        drop()
