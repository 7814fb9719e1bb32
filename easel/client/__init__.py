"""A small Python client for Easel or Wiro (same wire format): signs requests, runs, polls, downloads."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import httpx

from easel.signing import signature

TERMINAL = ("task_postprocess_end", "task_cancel")


class ApiError(RuntimeError):
    """The server answered ``result: false``; ``errors`` holds Wiro's ``[{code, message}]``."""

    def __init__(self, errors: list[dict], status: int):
        self.errors = errors
        self.status = status
        super().__init__("; ".join(f"[{e.get('code')}] {e.get('message')}" for e in errors) or f"HTTP {status}")


class Client:
    """Client for ``base_url`` (e.g. ``http://127.0.0.1:8000/v1`` or ``https://api.wiro.ai/v1``).

    With ``api_secret`` every request is signed (``x-nonce``, ``x-signature``: hex
    HMAC-SHA256 keyed with the API key over secret + nonce); without it only ``x-api-key`` is sent.
    """

    def __init__(self, base_url: str, api_key: str, api_secret: str | None = None, timeout: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.api_secret = api_secret
        self.http = httpx.Client(timeout=timeout)

    def headers(self) -> dict[str, str]:
        h = {"x-api-key": self.api_key}
        if self.api_secret:
            # Unix time in milliseconds, strictly increasing per client: unique and within the window.
            self._last_nonce = max(int(time.time() * 1000), getattr(self, "_last_nonce", 0) + 1)
            nonce = str(self._last_nonce)
            h["x-nonce"] = nonce
            h["x-signature"] = signature(self.api_key, self.api_secret, nonce)
        return h

    def _post(self, path: str, json_body: dict | None = None, data: dict | None = None,
              files: dict | None = None) -> dict:
        resp = self.http.post(f"{self.base_url}{path}", headers=self.headers(), json=json_body, data=data, files=files)
        try:
            payload = resp.json()
        except ValueError:
            raise ApiError([{"code": 0, "message": resp.text[:200]}], resp.status_code) from None
        if not payload.get("result"):
            raise ApiError(payload.get("errors", []), resp.status_code)
        return payload

    def run(self, tool: str, params: dict[str, Any], files: dict[str, Path] | None = None) -> dict:
        """Submit ``owner/slug`` with ``params``; files (name → path) go as multipart. Returns the Run answer."""
        if files:
            handles = {k: (Path(p).name, Path(p).read_bytes()) for k, p in files.items()}
            data = {k: (",".join(map(str, v)) if isinstance(v, list) else str(v)) for k, v in params.items()}
            return self._post(f"/Run/{tool}", data=data, files=handles)
        return self._post(f"/Run/{tool}", json_body=params)

    def detail(self, taskid: str) -> dict:
        return self._post("/Task/Detail", json_body={"taskid": str(taskid)})["tasklist"][0]

    def cancel(self, taskid: str) -> dict:
        return self._post("/Task/Cancel", json_body={"taskid": str(taskid)})["tasklist"][0]

    def kill(self, taskid: str) -> dict:
        return self._post("/Task/Kill", json_body={"taskid": str(taskid)})["tasklist"][0]

    def wait(self, taskid: str, on_update: Callable[[dict], None] | None = None, poll: float = 0.5,
             timeout: float = 3600) -> dict:
        """Poll Task/Detail until the task ends; ``on_update`` gets every detail seen."""
        deadline = time.time() + timeout
        while True:
            task = self.detail(taskid)
            if on_update:
                on_update(task)
            if task["status"] in TERMINAL:
                return task
            if time.time() > deadline:
                raise TimeoutError(f"task {taskid} still {task['status']} after {timeout} s")
            time.sleep(poll)

    def download(self, task: dict, folder: Path) -> list[Path]:
        """Save every output of a finished task into ``folder``; return the paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for out in task.get("outputs", []):
            resp = self.http.get(out["url"])
            resp.raise_for_status()
            path = folder / Path(out["name"]).name
            path.write_bytes(resp.content)
            paths.append(path)
        return paths
