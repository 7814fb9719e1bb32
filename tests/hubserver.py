"""A Hugging Face Hub on loopback: the test double of a service this machine cannot reach.

It speaks the part of the Hub's HTTP protocol that ``huggingface_hub`` (unchanged, pointed at it
with ``HF_ENDPOINT``) and Easel's downloader use:

- ``GET /api/{models|datasets}/{repo}[/revision/{revision}]`` (``model_info`` / ``repo_info``):
  ``id``, ``sha`` (the commit), ``siblings`` (``rfilename``, and with ``?blobs=true`` ``size``,
  ``blobId``, ``lfs {sha256, size, pointerSize}``), ``gated``;
- ``GET /api/{models|datasets}/{repo}/tree/{revision}[/{path}]`` (``list_repo_tree``, which
  ``snapshot_download`` reads);
- ``HEAD``/``GET /[datasets/]{repo}/resolve/{revision}/{path}``: small (git) files answer 200 with
  ``ETag``, ``X-Repo-Commit`` and ``Content-Length``; LFS files (weights) answer 302 to a "CDN"
  URL on this server with ``X-Linked-Etag`` (the sha256), ``X-Linked-Size`` and
  ``X-Repo-Commit``, as the Hub does; both honour ``Range`` (206 + ``Content-Range``);
- revisions by branch name (``main``), by commit hash and by ref (``refs/pr/5``, percent-encoded
  as the client sends it); unknown repo → 401 ``RepoNotFound``, unknown revision → 404
  ``RevisionNotFound``, unknown file → 404 ``EntryNotFound``; a gated repo answers 401
  ``GatedRepo`` without a token and 403 with a token it does not know;
- a Civitai-style download (``/api/download/models/{id}`` → 307 to a storage host, here
  ``localhost`` instead of ``127.0.0.1``, answering with ``Content-Disposition``).

:func:`seed_repos` lays out the repos of the catalog file for file as the real ones are (same
repo ids, names, folders, and the duplicate ``.bin`` / fp16 / single-file copies beside the
diffusers folders), filled with the project's tiny weights in each file's real format. It is all
generated at test time from ``easel.synthetic.tiny``.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pth", ".pt", ".onnx", ".msgpack", ".onnx_data", ".h5")


@dataclass
class HubFile:
    path: str
    data: Path  # content on disk
    size: int = 0
    sha256: str = ""
    git_oid: str = ""

    def __post_init__(self):
        if self.sha256:
            return
        h = hashlib.sha256()
        with open(self.data, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        self.size = self.data.stat().st_size
        self.sha256 = h.hexdigest()
        self.git_oid = hashlib.sha1(f"blob {self.size}\0".encode() + self.sha256.encode()).hexdigest()

    @property
    def lfs(self) -> bool:
        return self.path.endswith(LFS_SUFFIXES)


@dataclass
class HubRepo:
    """A repo: ``revisions`` maps a branch or ref name to its files (``main`` always)."""

    id: str
    revisions: dict[str, dict[str, HubFile]]
    repo_type: str = "model"
    gated: bool = False
    commits: dict[str, str] = field(default_factory=dict)  # revision name → commit sha

    def __post_init__(self):
        for name, files in self.revisions.items():
            spec = json.dumps(sorted((p, f.sha256) for p, f in files.items()))
            self.commits[name] = hashlib.sha1(f"{self.id}@{name}:{spec}".encode()).hexdigest()

    def files_at(self, revision: str) -> tuple[str, dict[str, HubFile]] | None:
        if revision in self.revisions:
            return self.commits[revision], self.revisions[revision]
        for name, sha in self.commits.items():
            if sha == revision:
                return sha, self.revisions[name]
        return None


class HubServer:
    """The server (a thread). ``gets`` records each file body it sent: ``(repo id, path, range)``;
    ``auth_seen`` the Authorization header of each request by path; ``throttle`` (bytes/s, 0 = off)
    slows bodies down; ``tokens`` are the HF tokens that may read gated repos."""

    def __init__(self, repos: list[HubRepo], storage_files: dict[str, Path] | None = None):
        self.repos = {(r.repo_type, r.id): r for r in repos}
        self.by_sha = {f.sha256: f for r in repos for files in r.revisions.values() for f in files.values()}
        self.storage_files = storage_files or {}  # Civitai-style: version id → file
        self.gets: list[tuple[str, str, str]] = []
        self.auth_seen: dict[str, str] = {}
        self.throttle = 0
        self.tokens = {"hf_test_token"}
        self._lock = threading.Lock()
        server = self

        class Handler(_Handler):
            hub = server

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> "HubServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def record(self, repo: str, path: str, rng: str) -> None:
        with self._lock:
            self.gets.append((repo, path, rng))

    def fetched(self, repo: str | None = None) -> list[str]:
        """Paths whose bodies were sent (of ``repo``, or ``repo/path`` for all)."""
        with self._lock:
            return [p if repo else f"{r}/{p}" for r, p, _ in self.gets if repo is None or r == repo]


class _Handler(http.server.BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    # -- helpers ------------------------------------------------------------------------------

    def _json(self, status: int, body, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _repo(self, kind: str, repo_id: str) -> HubRepo | None:
        repo = self.hub.repos.get((kind, repo_id))
        if repo is None:
            self._error(401, "RepoNotFound", f"Repository Not Found for url: {self.path}.")
            return None
        if repo.gated:
            auth = self.headers.get("Authorization", "")
            if not auth.startswith("Bearer "):
                self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it "
                                              "and be authenticated to access it. Please log in.")
                return None
            if auth[7:] not in self.hub.tokens:
                self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the "
                                              "authorized list.")
                return None
        return repo

    def _send_file(self, f: HubFile, repo_id: str, headers: dict) -> None:
        size = f.size
        start, end = 0, size - 1
        rng = self.headers.get("Range", "")
        status = 200
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
        if m:
            if m.group(1):
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else size - 1
            elif m.group(2):
                start = max(0, size - int(m.group(2)))
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        self.hub.record(repo_id, f.path, rng)
        with open(f.data, "rb") as fh:
            fh.seek(start)
            left = end - start + 1
            chunk = 64 * 1024
            while left > 0:
                block = fh.read(min(chunk, left))
                if not block:
                    break
                try:
                    self.wfile.write(block)
                except (BrokenPipeError, ConnectionResetError):
                    return
                left -= len(block)
                if self.hub.throttle:
                    time.sleep(len(block) / self.hub.throttle)

    # -- routes -------------------------------------------------------------------------------

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        raw = urlsplit(self.path)
        path, query = raw.path, raw.query
        self.hub.auth_seen[unquote(path)] = self.headers.get("Authorization", "")
        m = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m:
            return self._info("dataset" if m.group(1) == "datasets" else "model", m.group(2),
                              unquote(m.group(3) or "main"), "blobs=true" in query or "blobs=True" in query)
        m = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
        if m:
            return self._tree("dataset" if m.group(1) == "datasets" else "model", m.group(2), unquote(m.group(3)),
                              unquote(m.group(4) or ""))
        m = re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self._resolve("dataset" if m.group(1) else "model", m.group(2), unquote(m.group(3)),
                                 unquote(m.group(4)))
        m = re.fullmatch(r"/cdn/([0-9a-f]{40})/([0-9a-f]{64})/([^/]+/[^/]+)/(.+)", unquote(path))
        if m and m.group(2) in self.hub.by_sha:  # the CDN: signed URLs need no token
            f = self.hub.by_sha[m.group(2)]
            return self._send_file(HubFile(m.group(4), f.data, f.size, f.sha256, f.git_oid), m.group(3),
                                   {"ETag": f'"{f.sha256}"', "Content-Type": "application/octet-stream"})
        m = re.fullmatch(r"/api/download/models/(\d+)", path)
        if m and m.group(1) in self.hub.storage_files:  # Civitai: redirect to the storage host
            self.send_response(307)
            self.send_header("Location", f"http://localhost:{self.hub.port}/storage/{m.group(1)}?X-Amz-Signature=abc")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        m = re.fullmatch(r"/storage/(\d+)", path)
        if m and m.group(1) in self.hub.storage_files:
            data = self.hub.storage_files[m.group(1)]
            f = HubFile(data.name, data)
            return self._send_file(f, "civitai", {"Content-Disposition": f'attachment; filename="{data.name}"',
                                                   "Content-Type": "application/octet-stream"})
        self._error(404, "EntryNotFound", f"{path} not found")

    def _at(self, kind: str, repo_id: str, revision: str) -> tuple[HubRepo, str, dict[str, HubFile]] | None:
        """The repo and its commit and files at ``revision``; None once an error was answered."""
        repo = self._repo(kind, repo_id)
        if repo is None:
            return None
        at = repo.files_at(revision)
        if at is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo, at[0], at[1]

    def _info(self, kind: str, repo_id: str, revision: str, blobs: bool) -> None:
        found = self._at(kind, repo_id, revision)
        if found is None:
            return
        repo, sha, files = found
        siblings = []
        for p, f in sorted(files.items()):
            s = {"rfilename": p}
            if blobs:
                s.update({"size": f.size, "blobId": f.git_oid})
                if f.lfs:
                    s["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
            siblings.append(s)
        self._json(200, {"_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "sha": sha,
                         "private": False, "gated": "manual" if repo.gated else False, "disabled": False,
                         "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
                         "lastModified": "2024-01-01T00:00:00.000Z", "createdAt": "2023-01-01T00:00:00.000Z"})

    def _tree(self, kind: str, repo_id: str, revision: str, prefix: str) -> None:
        found = self._at(kind, repo_id, revision)
        if found is None:
            return
        _, _, files = found
        out, dirs = [], set()
        for p, f in sorted(files.items()):
            if prefix and not p.startswith(prefix.rstrip("/") + "/"):
                continue
            parts = p.split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in dirs and (not prefix or d.startswith(prefix.rstrip("/") + "/")):
                    dirs.add(d)
                    out.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0,
                                "path": d})
            entry = {"type": "file", "oid": f.git_oid, "size": f.size, "path": p}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
            out.append(entry)
        self._json(200, out)

    def _resolve(self, kind: str, repo_id: str, revision: str, filename: str) -> None:
        found = self._at(kind, repo_id, revision)
        if found is None:
            return
        _, sha, files = found
        f = files.get(filename)
        if f is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist at {revision}")
        if f.lfs:  # the Hub redirects LFS files to its CDN, with the file's metadata on the redirect
            self.send_response(302)
            # on another host name (the Hub's CDN is another host): clients do not follow it for metadata
            self.send_header("Location", f"http://localhost:{self.hub.port}/cdn/{sha}/{f.sha256}/{repo_id}/{filename}")
            self.send_header("X-Repo-Commit", sha)
            self.send_header("X-Linked-Etag", f'"{f.sha256}"')
            self.send_header("X-Linked-Size", str(f.size))
            self.send_header("ETag", f'"{f.git_oid}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._send_file(f, repo_id, {"ETag": f'"{f.git_oid}"', "X-Repo-Commit": sha,
                                     "Content-Type": "application/octet-stream"})


# -- the real repos' layouts, filled with tiny weights -------------------------------------------


def _files(folder: Path, prefix: str = "") -> dict[str, Path]:
    return {prefix + str(p.relative_to(folder)): p for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def seed_repos(tiny: dict[str, Path], work: Path) -> list[HubRepo]:
    """The Hub repos of the catalog's sources, each laid out as the real repo (names, folders, the
    duplicate copies a careless download would also fetch), filled with tiny weights.

    ``work`` receives the few files the tiny models do not have (a pickled ``.bin`` copy, a
    feature-extractor config, an ONNX pack...).
    """
    import torch
    from safetensors.torch import save_file

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)

    def extra(name: str, write) -> Path:
        p = work / name
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            write(p)
        return p

    pickle_copy = extra("copy.bin", lambda p: torch.save({"w": torch.zeros(4)}, str(p)))
    onnx_blob = extra("blob.onnx", lambda p: p.write_bytes(b"\x08\x07onnx-stand-in" * 64))
    small_st = extra("small.safetensors", lambda p: save_file({"w": torch.zeros(4)}, str(p)))
    feature = extra("preprocessor_config.json", lambda p: p.write_text(json.dumps({
        "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_normalize": True,
        "do_resize": True, "image_processor_type": "CLIPImageProcessor", "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "size": {"shortest_edge": 224}})))
    checker_cfg = extra("safety_checker_config.json", lambda p: p.write_text('{"_name_or_path": "stand-in"}'))

    def diffusers_repo(folder: Path, extra_files: dict[str, Path], feature_extractor: bool) -> dict[str, Path]:
        files = _files(folder)
        index = json.loads((Path(folder) / "model_index.json").read_text())
        if feature_extractor:  # SD 1.x repos list the safety checker and its feature extractor
            index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
            index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
            files["feature_extractor/preprocessor_config.json"] = feature
            files["safety_checker/config.json"] = checker_cfg
            files["safety_checker/model.safetensors"] = small_st
            files["safety_checker/pytorch_model.bin"] = pickle_copy
        name = f"model_index-{hashlib.sha1(str(folder).encode()).hexdigest()[:8]}-{int(feature_extractor)}.json"
        files["model_index.json"] = extra(name, lambda p: p.write_text(json.dumps(index, indent=2)))
        # the duplicate copies real repos carry beside the safetensors weights
        for p in list(files):
            if p.endswith("/diffusion_pytorch_model.safetensors"):
                files[p.replace(".safetensors", ".bin")] = pickle_copy
                files[p.replace(".safetensors", ".fp16.safetensors")] = files[p]
            if p.endswith("/model.safetensors") and not p.startswith("safety_checker"):
                files[p.replace("model.safetensors", "pytorch_model.bin")] = pickle_copy
                files[p.replace(".safetensors", ".fp16.safetensors")] = files[p]
        files.update(extra_files)
        return files

    def repo(rid: str, files: dict[str, Path], **kw) -> HubRepo:
        return HubRepo(rid, {"main": {p: HubFile(p, d) for p, d in files.items()}}, **kw)

    sd15, sdxl, flux = tiny["sd15"], tiny["sdxl"], tiny["flux"]
    sd15_single, sdxl_single = tiny["sd15-single-file"], tiny["sdxl-single-file"]
    repos = [
        repo("CompVis/stable-diffusion-v1-4", diffusers_repo(sd15, {
            "sd-v1-4.ckpt": pickle_copy, "unet/diffusion_flax_model.msgpack": onnx_blob}, True)),
        repo("SG161222/Realistic_Vision_V2.0", diffusers_repo(sd15, {"realisticVisionV20_v20.safetensors": sd15_single,
                                                                    "realisticVisionV20_v20.ckpt": pickle_copy}, True)),
        repo("Lykon/dreamshaper-8", diffusers_repo(sd15, {}, True)),
        repo("SG161222/Realistic_Vision_V5.1_noVAE", diffusers_repo(sd15, {
            "Realistic_Vision_V5.1_fp16-no-ema.safetensors": sd15_single}, True)),
        repo("SG161222/Realistic_Vision_V6.0_B1_noVAE", diffusers_repo(sd15, {
            "Realistic_Vision_V6.0_NV_B1.safetensors": sd15_single,
            "Realistic_Vision_V6.0_NV_B1_fp16.safetensors": sd15_single}, True)),
        repo("ItsJayQz/GTA5_Artwork_Diffusion", diffusers_repo(sd15, {"GTA5_Artwork_Diffusion.ckpt": pickle_copy}, True)),
        repo("stabilityai/stable-diffusion-xl-base-1.0", diffusers_repo(sdxl, {
            "sd_xl_base_1.0.safetensors": sdxl_single, "sd_xl_base_1.0_0.9vae.safetensors": sdxl_single,
            "onnx/unet/model.onnx": onnx_blob}, False)),
        repo("black-forest-labs/FLUX.1-dev", diffusers_repo(flux, {"flux1-dev.safetensors": small_st,
                                                                  "ae.safetensors": small_st}, False), gated=True),
        repo("XLabs-AI/flux-RealismLora", {"lora.safetensors": tiny["flux-lora-xlabs"]}),
        # not a real repo: where a test operator puts Comics Factory's (unpublished) LoRA
        repo("easel-test/comics-factory-v1", {"comics_factory_v1.safetensors": tiny["flux-lora-peft"]}),
        repo("nerijs/pixel-art-xl", {"pixel-art-xl.safetensors": tiny["sdxl-lora-kohya"]}),
        repo("ostris/emotion-sliders", {"emotion_happy_slider_v1.safetensors": tiny["sd15-lora-kohya"]}),
        # the file name of these was not seen by the research: the catalog takes the repo's one .safetensors
        repo("Muapi/minimalist-flat-icons-xl", {"minimalist-flat-icons-xl.safetensors": tiny["sdxl-lora-kohya"],
                                                "README.md": checker_cfg}),
        repo("lllyasviel/ic-light", {"iclight_sd15_fbc.safetensors": tiny["iclight-fbc"],
                                     "iclight_sd15_fc.safetensors": tiny["iclight-fbc"],
                                     "iclight_sd15_fcon.safetensors": tiny["iclight-fbc"]}),
        repo("briaai/RMBG-1.4", {"model.safetensors": tiny["rmbg"], "model.pth": pickle_copy,
                                 "pytorch_model.bin": pickle_copy, "onnx/model.onnx": onnx_blob,
                                 "config.json": checker_cfg}),
        repo("InstantX/InstantID", {**_files(tiny["sdxl-controlnet-identitynet"], "ControlNetModel/"),
                                    "ip-adapter.bin": tiny["instantid-ip-adapter"]}),
        repo("diffusers/controlnet-canny-sdxl-1.0", {**_files(tiny["sdxl-controlnet-canny"]),
                                                     "diffusion_pytorch_model.bin": pickle_copy}),
        repo("diffusers/controlnet-depth-sdxl-1.0", {**_files(tiny["sdxl-controlnet-depth"]),
                                                     "diffusion_pytorch_model.bin": pickle_copy,
                                                     "diffusion_pytorch_model.fp16.safetensors":
                                                         tiny["sdxl-controlnet-depth"] / "diffusion_pytorch_model.safetensors"}),
        repo("thibaud/controlnet-openpose-sdxl-1.0", {**_files(tiny["sdxl-controlnet-openpose"]),
                                                      "diffusion_pytorch_model.bin": pickle_copy}),
        repo("lllyasviel/Annotators", _files(tiny["pose-openpose"])),
        repo("DIAMONIK7777/antelopev2", {**_files(Path(tiny["faces"]) / "models" / "antelopev2"),
                                         "1k3d68.onnx": onnx_blob, "2d106det.onnx": onnx_blob,
                                         "genderage.onnx": onnx_blob}),
        HubRepo("Intel/dpt-hybrid-midas", {
            # main has only the pickled weights; the safetensors conversion is the open PR #5
            "main": {p: HubFile(p, d) for p, d in {**{k: v for k, v in _files(tiny["depth-dpt"]).items()
                                                      if not k.endswith(".safetensors")},
                                                   "pytorch_model.bin": pickle_copy}.items()},
            "refs/pr/5": {p: HubFile(p, d) for p, d in {**_files(tiny["depth-dpt"]),
                                                        "pytorch_model.bin": pickle_copy}.items()}}),
    ]
    return repos
