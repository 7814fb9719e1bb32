"""Shared fixtures: a real ``easel serve`` on a loopback port (tiny models, SQLite, one local
worker), projects made in its store, and a local HTTP file server for URL LoRAs."""
from __future__ import annotations

import base64
import http.server
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

import services
from easel.config import Settings
from easel.synthetic.tiny import make_tiny
from easel.signing import signature
from easel.store import Store

TOOL = "wiro/text-to-image-sd-lora"
# one operator key for every store and server of the session (the projects' API secrets are sealed
# with it, easel.store.secretbox), as a fleet's processes share one; tests of the key itself unset it
os.environ.setdefault("EASEL_SECRET_KEY", base64.urlsafe_b64encode(os.urandom(32)).decode())
# deadlines of waits on tasks scale with this (a heavily shared 2-core machine may need 2-3)
TIME_SCALE = float(os.environ.get("EASEL_TEST_TIME_SCALE", "3"))  # waits are deadlines: a task that ends early returns at once
SMALL = {"selectedLoraModel": [], "samples": 1, "steps": 3, "width": 64, "height": 64, "seed": "42",
         "clipSkip": 0, "prompt": "a red fish"}

# the missing-services summary (and CI's rule that a missing service fails): tests/services.py
pytest_terminal_summary = services.pytest_terminal_summary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PG: dict[Path, str] = {}


def _postgres_for(data_dir: Path) -> str:
    """One PostgreSQL database per data directory (a restarted or second server on the same
    directory shares it, as it would share the SQLite file); all dropped when the session ends."""
    if data_dir not in _PG:
        import atexit

        from pg import create_database

        _PG[data_dir], drop = create_database()
        atexit.register(drop)
    return _PG[data_dir]


class Server:
    """A running ``easel serve`` subprocess and helpers to call it as a client would."""

    def __init__(self, data_dir: Path, extra_args: tuple[str, ...] = (), env: dict | None = None,
                 database_url: str | None = None):
        self.data_dir = data_dir
        if database_url is None and os.environ.get("EASEL_TEST_POSTGRES") and not (env or {}).get("EASEL_DATABASE_URL"):
            database_url = _postgres_for(data_dir)  # the suite (or a part of it) against PostgreSQL
        database_url = database_url or (env or {}).get("EASEL_DATABASE_URL") or Settings(data_dir=data_dir).core.database_url
        self.env = {**os.environ, "EASEL_WEBHOOK_BACKOFF_SECONDS": "0.2", **(env or {}),
                    "EASEL_DATABASE_URL": database_url}
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None
        self.store = Store(database_url)
        self.store.migrate()

    def start(self) -> "Server":
        log = open(self.data_dir / "server.log", "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "easel", "serve", "--port", str(self.port), "--data-dir", str(self.data_dir),
             "--model-source", "tiny", "--fetch-allow", "127.0.0.1", *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                assert self.proc.poll() is None, (self.data_dir / "server.log").read_text()[-3000:]
            time.sleep(0.2)
        raise RuntimeError("server did not start")

    def wait_ready(self, timeout: float = 120) -> dict:
        """``/readyz`` once it answers 200: a worker has imported torch and waits for tasks (``start``
        returns as soon as ``/healthz`` answers, while the worker may still be starting)."""
        deadline = time.time() + timeout * TIME_SCALE
        while time.time() < deadline:
            r = httpx.get(f"{self.base}/readyz", timeout=5)
            if r.status_code == 200:
                return r.json()
            assert self.proc.poll() is None, (self.data_dir / "server.log").read_text()[-3000:]
            time.sleep(0.2)
        raise AssertionError(f"not ready: {r.text}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def project(self, auth: str = "signature", nonce_policy: str = "lenient"):
        return self.store.create_project(f"p-{time.time()}", auth, nonce_policy)

    def headers(self, project, nonce: str | None = None) -> dict:
        nonce = nonce or str(time.time_ns() // 1000)[:13]
        time.sleep(0.002)
        return {"x-api-key": project.apikey, "x-nonce": nonce,
                "x-signature": signature(project.apikey, project.apisecret, nonce)}

    def post(self, project, path: str, **kw) -> httpx.Response:
        headers = {**self.headers(project), **kw.pop("headers", {})}
        return httpx.post(f"{self.base}{path}", headers=headers, timeout=60, **kw)

    def run(self, project, params: dict, tool: str = TOOL, **kw) -> dict:
        r = self.post(project, f"/v1/Run/{tool}", json=params, **kw)
        assert r.status_code == 200, r.text
        return r.json()

    def detail(self, project, taskid: str) -> dict:
        r = self.post(project, "/v1/Task/Detail", json={"taskid": taskid})
        assert r.json()["result"], r.text
        return r.json()["tasklist"][0]

    def wait(self, project, taskid: str, timeout: float = 120, until=("task_postprocess_end", "task_cancel")) -> dict:
        deadline = time.time() + timeout * TIME_SCALE
        while time.time() < deadline:
            task = self.detail(project, taskid)
            if task["status"] in until:
                return task
            time.sleep(0.1)
        raise AssertionError(f"task {taskid} did not finish: {task}")

    def images(self, task: dict) -> list[bytes]:
        return [httpx.get(o["url"], timeout=30).content for o in task["outputs"]]


@pytest.fixture
def store(tmp_path):
    """A migrated SQLite store of its own (in-process tests of the store and the lifecycle)."""
    s = Store(Settings(data_dir=tmp_path).core.database_url)
    s.migrate()
    yield s
    s.engine.dispose()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("easel")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def project(server):
    return server.project()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", self.path[len("/redirect"):])
            self.end_headers()
            return
        super().do_GET()


@pytest.fixture(scope="session")
def file_server(tmp_path_factory, tiny):
    """Serves a folder on 127.0.0.1 with the tiny LoRAs and a pickle; yields (base_url, folder)."""
    folder = tmp_path_factory.mktemp("www")
    for name in ("sd15-lora-kohya", "sd15-lora-peft", "flux-lora-peft", "flux-lora-kohya", "flux-lora-xlabs",
                 "flux-lora-bfl"):
        (folder / f"{name}.safetensors").write_bytes(Path(tiny[name]).read_bytes())
    import pickle

    import torch
    from safetensors.torch import save_file

    save_file({"mystery.block.lora_left": torch.zeros(2, 2), "mystery.block.lora_right": torch.zeros(2, 2)},
              str(folder / "unknown-layout.safetensors"))

    (folder / "evil.safetensors").write_bytes(pickle.dumps({"not": "weights"}, protocol=4))
    handler = lambda *a, **k: _Files(*a, directory=str(folder), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", folder
    httpd.shutdown()


@pytest.fixture(scope="session")
def ceph_s3(tmp_path_factory):
    """A real S3 server for the session: Ceph's RADOS Gateway on a throwaway single-node cluster
    (``tests/ceph.py``) on loopback; yields the :class:`ceph.CephS3` (``endpoint``, ``access_key``,
    ``secret_key``) and stops every daemon afterwards, also on failure.

    Skipped only where the Ceph packages are missing and apt-get cannot install them (failed in CI,
    :mod:`services`); with the
    packages present, a failed start fails the tests that use it, with the daemons' logs."""
    import shutil

    import ceph

    services.require("Ceph")
    missing = ceph.missing_binaries()
    if missing:
        if shutil.which("apt-get") is None:
            services.missing("Ceph", f"not installed ({', '.join(missing)} missing) and there is no apt-get to "
                                     f"install Debian's {' '.join(ceph.PACKAGES)}")
        pytest.fail(f"Ceph is not installed ({', '.join(missing)} missing): scripts/test.sh installs it with "
                    f"apt-get install {' '.join(ceph.PACKAGES)}", pytrace=False)
    cluster = ceph.CephS3(tmp_path_factory.mktemp("ceph"), TIME_SCALE)
    try:
        cluster.start()
    except ceph.CephError as exc:
        pytest.fail(f"the Ceph RADOS Gateway did not start: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


def png_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def pixels(images: list[bytes]) -> list[bytes]:
    """Decoded RGB bytes of PNGs (ignores the metadata chunks)."""
    return [Image.open(io.BytesIO(b)).convert("RGB").tobytes() for b in images]
