"""Downloading catalog weights from the Hugging Face Hub: exactly the files a pipeline loads, with
progress, a disk-space check, resume, ``sha256`` verification and one download per file across
processes.

The Hub's own client, ``huggingface_hub``, answers what a repo holds at a revision
(``HfApi.model_info`` / ``dataset_info`` with ``files_metadata``: each file's size and LFS
``sha256``, and the commit the revision names), builds the file URLs (``hf_hub_url``) and the
request headers (``build_hf_headers``: ``HF_TOKEN``, user agent), and maps the Hub's error answers
(gated, not found) to its exception types. The bytes themselves are streamed here with ``httpx``
rather than with ``hf_hub_download`` because Easel needs what that function does not offer in
``huggingface_hub`` 1.x/2.x: resuming an interrupted file across processes (the Hub client writes
to a per-process temporary file it deletes), a kill check and byte progress for the task between
chunks, and verification of a pinned ``sha256``. ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are read
at each call.

Layout under ``root`` (``<data_dir>/models/hub``): ``<models|datasets>--<owner>--<name>/<revision>/``
holds the repo's files under their repo paths, a revision folder per pinned revision
(``refs/pr/5`` → ``refs--pr--5``). ``.easel/<selection>.json`` in it records a complete selection
(its files and the commit): a later resolution of the same selection answers from disk without
asking the Hub. Partial downloads live in ``<root>/.partial/`` only, never at a weights path.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from easel.weights.transfer import (DownloadError, LicenseNotAccepted, RemoteFile, check_disk, fetch_file,
                                   folder_lock, human_size, partial_path)

__all__ = ["COMPONENT_FILES", "DownloadError", "IGNORED", "LicenseNotAccepted", "Plan", "Progress", "RemoteFile",
           "check_disk", "complete_folder", "fetch_file", "human_size", "hub_endpoint", "hub_plan", "offline",
           "parse_hf_spec", "repo_folder", "run_plan"]

Progress = Callable[[int, int], None]
"""``progress(done, total)``: bytes of this download done so far and in all. It may raise (e.g.
``TaskKilled``) to stop the download; the partial file is then removed."""

# weights a pipeline never loads: half-precision and EMA copies, pickles, other frameworks
IGNORED = ("*.fp16*", "*non_ema*", "*.ckpt", "*.pt", "*.pth", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data",
           "*.bin", "onnx/*", "flax_model*", "tf_model*")
# the files of a diffusers component folder that from_pretrained reads
COMPONENT_FILES = ("*.json", "*.txt", "*.model", "*.safetensors")
# components the pipelines are built without (``safety_checker=None``)
SKIPPED_COMPONENTS = ("safety_checker",)
REPORT_EVERY = 0.25  # seconds between progress reports
PARALLEL = 4  # files streamed at once


@dataclass
class Plan:
    """The files of one selection and where they land (``folder / file.path``)."""

    label: str
    folder: Path
    files: list[RemoteFile]
    headers: dict = field(default_factory=dict)
    commit: str = ""
    marker: Path | None = None

    def missing(self) -> list[RemoteFile]:
        """Files not yet at their final path."""
        return [f for f in self.files if not (self.folder / f.path).is_file()]

    @property
    def total_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)


def hub_endpoint() -> str:
    """The Hub's base URL: ``$HF_ENDPOINT`` (read now) or https://huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


def offline() -> bool:
    """``HF_HUB_OFFLINE`` set (in the environment now, or in ``huggingface_hub.constants``)."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _token() -> str | None:
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token()


def repo_folder(root: Path, source: dict) -> Path:
    """``<root>/<models|datasets>--<owner>--<name>/<revision with / as -->``."""
    kind = "datasets" if source.get("repo_type") == "dataset" else "models"
    revision = (source.get("revision") or "main").replace("/", "--")
    return Path(root) / f"{kind}--{source['repo'].replace('/', '--')}" / revision


def _selection_key(source: dict) -> str:
    keys = ("files", "allow_patterns", "ignore_patterns", "weight_name", "subfolder", "layout")
    spec = json.dumps({k: source.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha1(spec.encode()).hexdigest()[:16]


def complete_folder(root: Path, source: dict) -> Path | None:
    """The local folder of ``source`` if its selection was downloaded completely, else None."""
    folder = repo_folder(root, source)
    marker = folder / ".easel" / f"{_selection_key(source)}.json"
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return None
    return folder if all((folder / f).is_file() for f in files) else None


def _hub_message(exc: Exception, what: str) -> str:
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    if isinstance(exc, GatedRepoError):
        return (f"{what} is gated: accept its conditions on its Hugging Face page with your account, then set "
                "HF_TOKEN to a token of that account (HTTP "
                f"{getattr(exc.response, 'status_code', '401/403')})")
    if isinstance(exc, RevisionNotFoundError):
        return f"{what}: the revision does not exist on the Hub"
    if isinstance(exc, RepositoryNotFoundError):
        return (f"{what} does not exist on the Hub, or is private: if your account can see it, set HF_TOKEN "
                "(HTTP 401/404)")
    if isinstance(exc, OfflineModeIsEnabled):
        return f"{what} is not on this machine and HF_HUB_OFFLINE is set (for offline testing: --model-source tiny)"
    if isinstance(exc, HfHubHTTPError):
        status = getattr(exc.response, "status_code", None)
        if status in (401, 403):
            return (f"{what}: the Hub refused access (HTTP {status}); set HF_TOKEN to a token of an account that "
                    "may read it (gated repos: accept their conditions on their page first)")
        return f"{what}: the Hub answered HTTP {status}"
    return (f"{what}: could not reach {hub_endpoint()} ({type(exc).__name__}: {exc}). Is this machine online? "
            "For offline testing run the server with --model-source tiny")


def _select(names: list[str], source: dict, model_index: Callable[[], dict] | None) -> list[str]:
    """The repo paths of ``source``'s selection among ``names`` (see :func:`hub_plan`)."""
    present = set(names)
    sub = (source.get("subfolder") or "").strip("/")
    if source.get("files"):
        chosen = list(source["files"])
    elif source.get("weight_name"):
        chosen = [f"{sub}/{source['weight_name']}" if sub else source["weight_name"]]
    elif source.get("allow_patterns"):
        chosen = [n for n in names if any(fnmatch.fnmatch(n, p) for p in source["allow_patterns"])]
        ignore = source.get("ignore_patterns", IGNORED)
        chosen = [n for n in chosen if not any(fnmatch.fnmatch(n, p) for p in ignore)]
    elif "model_index.json" in present and model_index is not None:
        # a diffusers pipeline folder: model_index.json and what each loaded component reads
        index = model_index()
        comps = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0]
                 and k not in SKIPPED_COMPONENTS]
        chosen = ["model_index.json"] + [
            n for n in names if "/" in n and n.split("/", 1)[0] in comps and "/" not in n.split("/", 1)[1]
            and any(fnmatch.fnmatch(n, p) for p in COMPONENT_FILES)
            and not any(fnmatch.fnmatch(n, p) for p in IGNORED)]
    else:
        prefix = f"{sub}/" if sub else ""
        chosen = [n for n in names if n.startswith(prefix) and any(fnmatch.fnmatch(n, p) for p in COMPONENT_FILES)
                  and not any(fnmatch.fnmatch(n, p) for p in IGNORED)]
    absent = [n for n in chosen if n not in present]
    if absent:
        raise DownloadError(f"not in the repo at this revision: {', '.join(absent)}")
    if not any(n.endswith((".safetensors", ".bin", ".onnx", ".pth")) for n in chosen):
        raise DownloadError("the selection holds no weights file (check the revision and allow_patterns)")
    return chosen


def hub_plan(root: Path, source: dict) -> Plan:
    """What to download for a catalog ``hf`` source, asking the Hub (``HfApi``) what the repo
    holds at the source's ``revision``.

    The selection is, in this order: ``files`` (exact repo paths), ``weight_name`` (in
    ``subfolder``), ``allow_patterns`` (minus ``ignore_patterns``, default :data:`IGNORED`), a
    diffusers pipeline (``model_index.json`` and, of each component it lists except the safety
    checker, the configs, tokenizer files and ``.safetensors`` weights, without fp16/EMA copies,
    pickles or single-file checkpoints), else the configs and ``.safetensors`` of ``subfolder``.
    ``sha256`` (a hex string for one file, or path → hex) pins hashes; the Hub's LFS hashes are
    checked otherwise.

    Raises:
        DownloadError: the Hub refused or failed (gated, not found, offline, ...), or the selection
            names files the revision does not have or holds no weights.
    """
    from huggingface_hub import HfApi, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    repo, revision = source["repo"], source.get("revision") or "main"
    repo_type = "dataset" if source.get("repo_type") == "dataset" else "model"
    label = f"{'dataset ' if repo_type == 'dataset' else ''}{repo}@{revision}"
    folder = repo_folder(root, source)
    if offline():
        raise DownloadError(f"{label} is not on this machine and HF_HUB_OFFLINE is set (download it with `easel models "
                            "pull` while online; for offline testing run the server with --model-source tiny)")
    endpoint, token = hub_endpoint(), _token()
    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = (api.dataset_info if repo_type == "dataset" else api.model_info)(repo, revision=revision,
                                                                                  files_metadata=True)
    except Exception as exc:  # huggingface_hub raises many types (HTTP, connection, offline)
        raise DownloadError(_hub_message(exc, label)) from None
    siblings = {s.rfilename: s for s in (info.siblings or [])}
    pins = source.get("sha256") or {}
    headers = build_hf_headers(token=token)

    def remote(name: str) -> RemoteFile:
        s = siblings[name]
        lfs = getattr(s, "lfs", None)
        pin = pins if isinstance(pins, str) else pins.get(name)
        return RemoteFile(name, hf_hub_url(repo, name, repo_type=repo_type, revision=info.sha, endpoint=endpoint),
                          getattr(s, "size", None) or (lfs.size if lfs else None),
                          pin or (lfs.sha256 if lfs else None))

    def model_index() -> dict:
        f = remote("model_index.json")
        with folder_lock(root, folder):
            if not (folder / f.path).is_file():
                fetch_file(f, folder / f.path, root, headers)
        return json.loads((folder / f.path).read_text())

    try:
        names = _select(sorted(siblings), source, model_index)
    except DownloadError as exc:
        raise DownloadError(f"{label}: {exc}") from None
    if isinstance(pins, str) and len(names) != 1:
        raise DownloadError(f"{label}: one sha256 pinned for {len(names)} files; pin a path → hash table")
    return Plan(f"hf:{label}", folder, [remote(n) for n in names], headers, info.sha or "",
                folder / ".easel" / f"{_selection_key(source)}.json")


class _Stopped(Exception):
    """Another file of the same plan failed or the caller stopped the download."""


def run_plan(plan: Plan, root: Path, progress: Progress | None = None, reserve_bytes: int = 0,
             on_file: Callable[[RemoteFile], None] | None = None,
             on_bytes: Callable[[RemoteFile, int], None] | None = None, parallel: int = PARALLEL) -> Path:
    """Fetch the plan's missing files under one lock per folder (another process fetching the
    same files is waited for, then nothing is fetched twice); return ``plan.folder``.

    Up to ``parallel`` files stream at once (as ``snapshot_download`` does). ``progress(done,
    total)`` is called from this thread every 0.25 s while bytes arrive, and while waiting for
    another process's download of the same folder (with ``done`` 0): when it raises (a kill),
    every file stops at its next chunk and its part is removed. ``on_file(f)`` is told when a file
    starts and ``on_bytes(f, n)`` each chunk (from the download threads; ``easel models pull``'s
    bars).

    Raises:
        DownloadError: see :func:`fetch_file` and :func:`check_disk`.
    """
    import threading
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    from filelock import Timeout

    lock = folder_lock(root, plan.folder)
    total = sum(f.size or 0 for f in plan.missing())
    while True:
        try:
            lock.acquire(timeout=0.5)
            break
        except Timeout:
            if progress:
                progress(0, total)
    try:
        missing = plan.missing()
        total = sum(f.size or 0 for f in missing)
        if missing:
            held = sum(partial_path(root, plan.folder / f.path).stat().st_size
                       for f in missing if partial_path(root, plan.folder / f.path).exists())
            check_disk(plan.folder, max(0, total - held), reserve_bytes)
        done = 0
        counter = threading.Lock()
        stop = threading.Event()

        def fetch(f: RemoteFile) -> None:
            def tick(n: int) -> None:
                nonlocal done
                if stop.is_set():
                    raise _Stopped()
                with counter:
                    done += n
                if on_bytes:
                    on_bytes(f, n)

            if on_file:
                on_file(f)
            fetch_file(f, plan.folder / f.path, root, plan.headers, tick)

        if progress and missing:
            progress(0, total)
        if missing:
            with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(missing))),
                                    thread_name_prefix="easel-download") as pool:
                futures = [pool.submit(fetch, f) for f in missing]
                try:
                    while True:
                        finished, pending = wait(futures, timeout=REPORT_EVERY, return_when=FIRST_EXCEPTION)
                        if progress:
                            progress(done, total)
                        if not pending or any(fut.exception() for fut in finished):
                            break
                    errors = [fut.exception() for fut in futures if fut.done() and fut.exception()]
                    real = [e for e in errors if not isinstance(e, _Stopped)]
                    if real:
                        raise real[0]
                finally:
                    stop.set()  # the other files stop at their next chunk (their parts are removed)
        if plan.marker is not None:
            plan.marker.parent.mkdir(parents=True, exist_ok=True)
            plan.marker.write_text(json.dumps({"files": [f.path for f in plan.files], "commit": plan.commit,
                                               "label": plan.label, "sizes": {f.path: f.size for f in plan.files}}))
        return plan.folder
    finally:
        lock.release()


def parse_hf_spec(spec: str) -> dict:
    """``owner/name[:path/in/repo][@revision]`` (``easel models set --hf``) → an ``hf`` source.

    Raises:
        ValueError: not of that form.
    """
    m = re.fullmatch(r"([\w.-]+/[\w.-]+)(?::([^@]+))?(?:@(.+))?", spec.strip())
    if not m:
        raise ValueError(f"{spec!r} is not owner/name[:file][@revision]")
    source = {"type": "hf", "repo": m.group(1)}
    if m.group(2):
        source["files"] = [m.group(2)]
    if m.group(3):
        source["revision"] = m.group(3)
    return source
