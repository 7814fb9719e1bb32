"""A small Python client for Easel or Wiro (same wire format): signs requests, runs, follows tasks
over the WebSocket (falling back to polling), downloads outputs, and verifies webhooks.

``Client`` is synchronous (httpx + ``websockets.sync``); ``AsyncClient`` has the same methods as
coroutines (httpx.AsyncClient + ``websockets.asyncio``). ``verify_webhook(secret, headers, body)``
checks a webhook Easel sent (Standard Webhooks scheme, see ``easel.signing``).
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import httpx

from easel.signing import WebhookVerificationError, signature, verify_webhook

__all__ = ["Client", "AsyncClient", "ApiError", "verify_webhook", "WebhookVerificationError", "socket_url_for"]

TERMINAL = ("task_postprocess_end", "task_cancel")
# Task/Detail on Wiro itself may also end a task that failed before it ran as status "task_error"
# (the Wiro MCP treats it as terminal); on the socket, task_error is an interim stderr line.
DETAIL_TERMINAL = TERMINAL + ("task_error",)
WIRO_API_HOST = "api.wiro.ai"
WIRO_SOCKET_URL = "wss://socket.wiro.ai/v1"


class ApiError(RuntimeError):
    """The server answered ``result: false``; ``errors`` holds Wiro's ``[{code, message}]``."""

    def __init__(self, errors: list[dict], status: int):
        self.errors = errors
        self.status = status
        super().__init__("; ".join(f"[{e.get('code')}] {e.get('message')}" for e in errors) or f"HTTP {status}")


def socket_url_for(base_url: str) -> str:
    """The WebSocket URL of a server: ``http(s)://host/v1`` → ``ws(s)://host/v1``; Wiro's own
    API (``https://api.wiro.ai/v1``) has its socket on another host, ``wss://socket.wiro.ai/v1``."""
    parts = urlsplit(base_url.rstrip("/"))
    if parts.hostname == WIRO_API_HOST:
        return WIRO_SOCKET_URL
    return urlunsplit(("wss" if parts.scheme == "https" else "ws", parts.netloc, parts.path or "/v1", "", ""))


def _run_payload(params: dict, files: dict | None) -> dict:
    if files:
        handles = {k: (Path(p).name, Path(p).read_bytes()) for k, p in files.items()}
        data = {k: (",".join(map(str, v)) if isinstance(v, list) else str(v)) for k, v in params.items()}
        return {"data": data, "files": handles}
    return {"json_body": params}


def _checked(resp: httpx.Response) -> dict:
    try:
        payload = resp.json()
    except ValueError:
        raise ApiError([{"code": 0, "message": resp.text[:200]}], resp.status_code) from None
    if not payload.get("result"):
        raise ApiError(payload.get("errors", []), resp.status_code)
    return payload


class _Base:
    def __init__(self, base_url: str, api_key: str, api_secret: str | None = None, socket_url: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.api_secret = api_secret
        self.socket_url = socket_url or socket_url_for(self.base_url)

    def headers(self) -> dict[str, str]:
        h = {"x-api-key": self.api_key}
        if self.api_secret:
            # Unix time in milliseconds, strictly increasing per client: unique and within the window.
            self._last_nonce = max(int(time.time() * 1000), getattr(self, "_last_nonce", 0) + 1)
            nonce = str(self._last_nonce)
            h["x-nonce"] = nonce
            h["x-signature"] = signature(self.api_key, self.api_secret, nonce)
        return h

    def _ws_url(self, previews: bool, phases: bool = False) -> str:
        query = "&".join(name + "=1" for name, on in (("previews", previews), ("phases", phases)) if on)
        return self.socket_url + ("?" + query if query else "")


class Client(_Base):
    """Client for ``base_url`` (e.g. ``http://127.0.0.1:8000/v1`` or ``https://api.wiro.ai/v1``).

    With ``api_secret`` every request is signed (``x-nonce``, ``x-signature``: hex
    HMAC-SHA256 keyed with the API key over secret + nonce); without it only ``x-api-key`` is sent.
    ``socket_url`` defaults to the base URL with a ``ws(s)`` scheme (Wiro's is ``wss://socket.wiro.ai/v1``).
    """

    def __init__(self, base_url: str, api_key: str, api_secret: str | None = None, timeout: float = 60.0,
                 socket_url: str | None = None):
        super().__init__(base_url, api_key, api_secret, socket_url)
        self.http = httpx.Client(timeout=timeout)

    def _post(self, path: str, json_body: dict | None = None, data: dict | None = None,
              files: dict | None = None, headers: dict | None = None) -> dict:
        return _checked(self.http.post(f"{self.base_url}{path}", headers={**self.headers(), **(headers or {})},
                                       json=json_body, data=data, files=files))

    def run(self, tool: str, params: dict[str, Any], files: dict[str, Path] | None = None, wait: bool = False,
            on_event: Callable[[dict], None] | None = None, idempotency_key: str | None = None,
            timeout: float = 3600) -> dict:
        """Submit ``owner/slug`` with ``params``; files (name → path) go as multipart.

        Returns:
            The Run answer, or with ``wait=True`` the finished task (Task/Detail item), followed
            over the WebSocket (``on_event`` gets every frame) or, if the socket fails, by polling.

        Raises:
            ApiError: the server refused the Run. TimeoutError: ``wait`` exceeded ``timeout`` s.
        """
        extra = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        answer = self._post(f"/Run/{tool}", headers=extra, **_run_payload(params, files))
        if not wait:
            return answer
        return self.follow(answer["taskid"], answer["socketaccesstoken"], on_event, timeout)

    def upload(self, name: str, data: bytes, folderid: str = "") -> dict:
        """``POST /File/Upload``: upload ``data`` as file ``name``; returns the ``list`` entry (``id``,
        ``name``, ``url``, ``accesskey``...). A Run may then name the file by ``url`` or bare ``name``."""
        fields = {"folderid": folderid} if folderid else None
        return self._post("/File/Upload", data=fields, files={"file": (name, data)})["list"][0]

    def events(self, tasktoken: str, previews: bool = False, timeout: float = 3600,
               phases: bool = False) -> Iterator[dict]:
        """Yield the task's WebSocket frames (history first) until its terminal frame.

        ``previews``: progress frames carry the latent preview (Easel's ``?previews=1``);
        ``phases``: the stepless phases ("Waiting for a worker", "Loading weights") come as
        ``task_output`` frames with ``stepTotal`` "0" (Easel's ``?phases=1``; a server that does
        not know the option, Wiro's, ignores it)."""
        from websockets.sync.client import connect

        deadline = time.time() + timeout
        with connect(self._ws_url(previews, phases), open_timeout=10, max_size=None) as ws:
            ws.send(json.dumps({"type": "task_info", "tasktoken": tasktoken}))
            while True:
                frame = json.loads(ws.recv(timeout=max(0.1, deadline - time.time())))
                yield frame
                if frame.get("type") in TERMINAL or frame.get("result") is False:
                    return

    def follow(self, taskid: str, tasktoken: str, on_event: Callable[[dict], None] | None = None,
               timeout: float = 3600) -> dict:
        """Wait for a task to end via the WebSocket (polling Task/Detail if the socket fails)."""
        try:
            for frame in self.events(tasktoken, timeout=timeout):
                if on_event:
                    on_event(frame)
        except TimeoutError:
            raise
        except Exception:  # no socket (proxy, older server): poll instead
            return self.wait(taskid, timeout=timeout)
        return self.wait(taskid, timeout=timeout)

    def detail(self, taskid: str) -> dict:
        return self._post("/Task/Detail", json_body={"taskid": str(taskid)})["tasklist"][0]

    def cancel(self, taskid: str) -> dict:
        return self._post("/Task/Cancel", json_body={"taskid": str(taskid)})["tasklist"][0]

    def kill(self, taskid: str) -> dict:
        return self._post("/Task/Kill", json_body={"taskid": str(taskid)})["tasklist"][0]

    def delete(self, taskid: str) -> dict:
        """Task/InputOutputDelete: remove a finished task's files (the record stays). Sent by
        ``tasktoken``, the parameter Wiro's tasks.md documents (Easel also takes ``taskid``)."""
        token = self.detail(taskid)["socketaccesstoken"]
        return self._post("/Task/InputOutputDelete", json_body={"tasktoken": token})

    def tasks(self, limit: int = 20, start: int = 0, status: str = "") -> list[dict]:
        """Task/List: the project's tasks, newest first (the Wiro MCP's body; Easel adds ``status``)."""
        body = {"type": "model", "sort": "id", "order": "DESC", "limit": str(limit), "start": str(start)}
        if status:
            body["status"] = status
        return self._post("/Task/List", json_body=body)["tasklist"]

    def wait(self, taskid: str, on_update: Callable[[dict], None] | None = None, poll: float = 0.5,
             timeout: float = 3600) -> dict:
        """Poll Task/Detail until the task ends; ``on_update`` gets every detail seen."""
        deadline = time.time() + timeout
        while True:
            task = self.detail(taskid)
            if on_update:
                on_update(task)
            if task["status"] in DETAIL_TERMINAL:
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
            if not out.get("url"):  # an LLM's raw content entry has no file
                continue
            resp = self.http.get(out["url"])
            resp.raise_for_status()
            path = folder / Path(out["name"]).name
            path.write_bytes(resp.content)
            paths.append(path)
        return paths


class AsyncClient(_Base):
    """``Client`` for asyncio: the same methods as coroutines (``events`` is an async iterator)."""

    def __init__(self, base_url: str, api_key: str, api_secret: str | None = None, timeout: float = 60.0,
                 socket_url: str | None = None):
        super().__init__(base_url, api_key, api_secret, socket_url)
        self.http = httpx.AsyncClient(timeout=timeout)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _post(self, path: str, json_body: dict | None = None, data: dict | None = None,
                    files: dict | None = None, headers: dict | None = None) -> dict:
        return _checked(await self.http.post(f"{self.base_url}{path}", headers={**self.headers(), **(headers or {})},
                                             json=json_body, data=data, files=files))

    async def run(self, tool: str, params: dict[str, Any], files: dict[str, Path] | None = None, wait: bool = False,
                  on_event: Callable[[dict], None] | None = None, idempotency_key: str | None = None,
                  timeout: float = 3600) -> dict:
        """As :meth:`Client.run`."""
        extra = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        answer = await self._post(f"/Run/{tool}", headers=extra, **_run_payload(params, files))
        if not wait:
            return answer
        try:
            async with asyncio.timeout(timeout):
                async for frame in self.events(answer["socketaccesstoken"]):
                    if on_event:
                        on_event(frame)
        except TimeoutError:
            raise
        except Exception:  # no socket: poll
            return await self.wait(answer["taskid"], timeout=timeout)
        return await self.detail(answer["taskid"])

    async def events(self, tasktoken: str, previews: bool = False, phases: bool = False) -> AsyncIterator[dict]:
        """Yield the task's WebSocket frames (history first) until its terminal frame (``previews``,
        ``phases``: as :meth:`Client.events`)."""
        from websockets.asyncio.client import connect

        async with connect(self._ws_url(previews, phases), open_timeout=10, max_size=None) as ws:
            await ws.send(json.dumps({"type": "task_info", "tasktoken": tasktoken}))
            async for raw in ws:
                frame = json.loads(raw)
                yield frame
                if frame.get("type") in TERMINAL or frame.get("result") is False:
                    return

    async def detail(self, taskid: str) -> dict:
        return (await self._post("/Task/Detail", json_body={"taskid": str(taskid)}))["tasklist"][0]

    async def wait(self, taskid: str, poll: float = 0.5, timeout: float = 3600) -> dict:
        deadline = time.time() + timeout
        while True:
            task = await self.detail(taskid)
            if task["status"] in DETAIL_TERMINAL:
                return task
            if time.time() > deadline:
                raise TimeoutError(f"task {taskid} still {task['status']} after {timeout} s")
            await asyncio.sleep(poll)
