"""The Hub path (``--model-source hub``) against a Hub on loopback (``tests/hubserver.py``): the
real ``huggingface_hub`` client and Easel's downloader fetch from repos laid out like the real
ones; exactly the files each pipeline loads, licences, tokens, hashes, kills, resume, locks, and a
Civitai-style URL through the safe fetcher."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from easel.catalog import CatalogError, ModelCatalog
from easel.config import Settings
from easel.weights.download import (DownloadError, LicenseNotAccepted, complete_folder, fetch_file,
                                   hub_plan, repo_folder, run_plan)
from easel.weights.sources import ModelSources
from easel.weights.transfer import partial_path
from hubserver import HubServer, seed_repos

# what the five seeds' own requests load: checkpoints, fixed components, the face pack
SEED_IDS = ("1", "79", "flux.1-dev", "iclight-sd15-fbc", "rmbg-1.4", "instantid-identitynet", "instantid-ip-adapter",
            "antelopev2")


@pytest.fixture(scope="module")
def hub(tiny, tmp_path_factory):
    server = HubServer(seed_repos(tiny, tmp_path_factory.mktemp("hubfiles")),
                       storage_files={"657897": Path(tiny["sdxl-single-file"])}).start()
    yield server
    server.stop()


@pytest.fixture
def env(hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-easel-test")  # no stored token of the machine's user
    with hub._lock:
        hub.gets.clear()
    hub.throttle = 0
    return hub


def _sources(tmp_path: Path, override: dict | None = None, accept=("all",)) -> ModelSources:
    path = tmp_path / "catalog.override.json"
    if override:
        tmp_path.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"models": override}))
    settings = Settings(data_dir=tmp_path, model_source="hub", accept_licenses=tuple(accept), fetch_allow=("127.0.0.1",
                        "localhost"), download_reserve_bytes=0)
    return ModelSources(settings, ModelCatalog.load(path if override else None))


def _no_partials(tmp_path: Path) -> None:
    partial = tmp_path / "models" / "hub" / ".partial"
    assert not partial.exists() or not any(partial.iterdir()), list(partial.iterdir())


def test_huggingface_hub_itself_downloads_from_the_loopback_hub(env, tmp_path):
    """The test double speaks the protocol: the unchanged client's snapshot_download (repo info,
    tree, HEAD metadata through the CDN redirect) and hf_hub_download of a refs/pr revision. (The
    client reads HF_ENDPOINT once, at import: here it is passed as ``endpoint``.)"""
    from huggingface_hub import hf_hub_download, snapshot_download

    folder = Path(snapshot_download("diffusers/controlnet-canny-sdxl-1.0", cache_dir=tmp_path / "raw",
                                        endpoint=env.url))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.bin",
                                                         "diffusion_pytorch_model.safetensors"]
    path = hf_hub_download("Intel/dpt-hybrid-midas", "model.safetensors", revision="refs/pr/5",
                           cache_dir=tmp_path / "raw", endpoint=env.url)
    assert Path(path).stat().st_size > 0
    with pytest.raises(Exception, match="model.safetensors"):  # not on main
        hf_hub_download("Intel/dpt-hybrid-midas", "model.safetensors", cache_dir=tmp_path / "raw", endpoint=env.url)


def test_seed_weights_fetch_exactly_what_the_pipelines_load(env, tmp_path):
    """Every id the seeds' own requests need resolves; no duplicate copy (.bin beside
    .safetensors, fp16, single-file checkpoints, the safety checker, ONNX exports) is fetched, no
    file twice; a second resolution answers from disk without asking the Hub."""
    sources = _sources(tmp_path)
    catalog = sources.catalog
    for mid in SEED_IDS:
        entry = catalog.get(mid)
        if mid == "flux.1-dev":
            continue  # gated: needs HF_TOKEN (see the next test)
        if entry.kind in ("sd15", "sdxl", "flux"):
            sources.checkpoint(entry)
        elif entry.kind == "face-analysis":
            sources.face_root()
        else:
            sources.component(entry)
    fetched = env.fetched()
    assert len(fetched) == len(set(fetched)), "a file was fetched twice"
    dupes = [p for p in fetched if p.endswith((".ckpt", ".msgpack", ".pth")) or ".fp16." in p
             or "safety_checker" in p or "/onnx/" in p or p.endswith("sd_xl_base_1.0.safetensors")
             or p.endswith(("flux1-dev.safetensors", "/ae.safetensors"))
             or (p.endswith(".bin") and not p.endswith("InstantX/InstantID/ip-adapter.bin"))]
    assert dupes == []
    assert "CompVis/stable-diffusion-v1-4/unet/diffusion_pytorch_model.safetensors" in fetched
    assert "stabilityai/stable-diffusion-xl-base-1.0/text_encoder_2/model.safetensors" in fetched
    face = tmp_path / "models" / "insightface" / "models" / "antelopev2"
    assert sorted(p.name for p in face.iterdir()) == ["glintr100.onnx", "scrfd_10g_bnkps.onnx"]
    with env._lock:
        env.gets.clear()
    sources.checkpoint(catalog.get("1"))
    assert env.fetched() == [] and complete_folder(tmp_path / "models" / "hub", catalog.get("1").source)
    _no_partials(tmp_path)


def test_a_lora_repo_whose_file_name_is_unknown_gives_its_one_safetensors(env, tmp_path):
    sources = _sources(tmp_path)
    weights = sources.lora(sources.catalog.get("480"))
    assert weights.path.name == "minimalist-flat-icons-xl.safetensors"
    assert env.fetched("Muapi/minimalist-flat-icons-xl") == ["minimalist-flat-icons-xl.safetensors"]


def test_gated_repo_needs_a_token_and_says_so(env, tmp_path, monkeypatch):
    sources = _sources(tmp_path)
    flux = sources.catalog.get("flux.1-dev")
    with pytest.raises(CatalogError, match=r"is gated.*HF_TOKEN.*HTTP 401"):
        sources.checkpoint(flux)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(CatalogError, match=r"is gated.*HTTP 403"):
        sources.checkpoint(flux)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    weights = sources.checkpoint(flux)
    assert (weights.path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (weights.path / "flux1-dev.safetensors").exists()
    assert env.auth_seen["/api/models/black-forest-labs/FLUX.1-dev/revision/main"] == "Bearer hf_test_token"
    assert not any(k.startswith("/cdn/") and v for k, v in env.auth_seen.items())  # the token stays on the Hub host


def test_unaccepted_licence_fetches_nothing_and_names_the_way_to_accept(env, tmp_path):
    sources = _sources(tmp_path, accept=())
    with pytest.raises(LicenseNotAccepted) as e:
        sources.component(sources.catalog.get("rmbg-1.4"))
    assert "bria-rmbg-1.4" in str(e.value) and "EASEL_ACCEPT_LICENSES=bria-rmbg-1.4" in str(e.value) \
        and "--accept-license bria-rmbg-1.4" in str(e.value)
    assert env.fetched() == []
    sources.record_license(["bria-rmbg-1.4"])  # what `easel models pull --accept-license` records
    assert sources.component(sources.catalog.get("rmbg-1.4")).path.name == "model.safetensors"


def test_a_pinned_sha256_mismatch_a_missing_file_and_a_missing_repo_end_clearly(env, tmp_path):
    sources = _sources(tmp_path, {
        "655": {"source": {"type": "hf", "repo": "XLabs-AI/flux-RealismLora", "files": ["lora.safetensors"],
                           "sha256": "0" * 64}},
        "62": {"source": {"type": "hf", "repo": "ostris/emotion-sliders", "files": ["nope.safetensors"]}},
        "68": {"source": {"type": "hf", "repo": "nobody/nothing", "files": ["x.safetensors"]}}})
    catalog = sources.catalog
    with pytest.raises(DownloadError, match=r"lora.safetensors: sha256 mismatch \(expected 0{64}, got [0-9a-f]{64}\)"):
        sources.lora(catalog.get("655"))
    folder = repo_folder(tmp_path / "models" / "hub", catalog.get("655").source)
    assert not (folder / "lora.safetensors").exists()
    with pytest.raises(DownloadError, match="not in the repo at this revision: nope.safetensors"):
        sources.lora(catalog.get("62"))
    with pytest.raises(DownloadError, match="nobody/nothing@main does not exist on the Hub, or is private"):
        sources.lora(catalog.get("68"))
    _no_partials(tmp_path)


def test_a_kill_mid_download_leaves_no_partial_and_an_interrupted_one_resumes(env, tmp_path):
    root = tmp_path / "models" / "hub"
    plan = hub_plan(root, {"repo": "InstantX/InstantID", "files": ["ip-adapter.bin"]})
    env.throttle = 500_000  # bytes/s: the file takes seconds, so the first progress report comes mid-file on a loaded machine
    seen = []

    class Killed(Exception):
        pass

    def progress(done, total):
        seen.append((done, total))
        if done > 0:
            raise Killed()

    with pytest.raises(Killed):
        run_plan(plan, root, progress)
    assert seen[0] == (0, plan.files[0].size) and not (plan.folder / "ip-adapter.bin").exists()
    _no_partials(tmp_path)
    env.throttle = 0
    # an interrupted `pull` (Ctrl-C, a crash) leaves its part, which the next try resumes with Range
    f = plan.files[0]
    part = partial_path(root, plan.folder / f.path)
    part.parent.mkdir(parents=True, exist_ok=True)
    data = Path(env.by_sha[f.sha256].data).read_bytes()
    part.write_bytes(data[:1000])
    fetch_file(f, plan.folder / f.path, root, plan.headers)
    assert (plan.folder / f.path).read_bytes() == data and not part.exists()
    assert env.gets[-1][2] == "bytes=1000-"


def test_two_workers_asking_for_the_same_missing_repo_download_it_once(env, tmp_path):
    env.throttle = 20_000_000
    results, errors = [], []

    def worker():
        try:
            results.append(_sources(tmp_path).checkpoint(ModelCatalog.load().get("54")).path)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and len(results) == 2 and results[0] == results[1]
    fetched = env.fetched("Lykon/dreamshaper-8")
    assert len(fetched) == len(set(fetched)) and "unet/diffusion_pytorch_model.safetensors" in fetched


def test_two_processes_pulling_the_same_repo_download_each_file_once(env, tmp_path):
    """Two `easel models pull` processes (as two workers, or a worker and an operator) asking for
    the same missing repo at once: the folder lock makes the second wait for the first, so every
    file crosses the network once and both exit 0 with the same complete folder."""
    env.throttle = 4_000_000
    env_vars = {"HF_ENDPOINT": env.url, "EASEL_DATA_DIR": str(tmp_path), "EASEL_DOWNLOAD_RESERVE_BYTES": "0",
                "HF_HOME": "/nonexistent-easel-test"}
    procs = [subprocess.Popen([sys.executable, "-m", "easel", "models", "pull", "54"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**os.environ, **env_vars})
             for _ in range(2)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    fetched = env.fetched("Lykon/dreamshaper-8")
    assert "unet/diffusion_pytorch_model.safetensors" in fetched
    assert len(fetched) == len(set(fetched)), fetched
    _no_partials(tmp_path)


def test_too_little_disk_space_refuses_with_the_numbers(env, tmp_path):
    settings = Settings(data_dir=tmp_path, model_source="hub", accept_licenses=("all",),
                        download_reserve_bytes=1 << 60)
    sources = ModelSources(settings, ModelCatalog.load())
    with pytest.raises(DownloadError, match=r"not enough disk space .* needs [\d.]+ MB plus .* kept free, .* is free"):
        sources.checkpoint(sources.catalog.get("632"))
    assert env.fetched("ItsJayQz/GTA5_Artwork_Diffusion") == ["model_index.json"]  # read to choose the files
    _no_partials(tmp_path)


def test_a_civitai_style_url_follows_the_redirect_and_keeps_the_token_on_civitai(env, tmp_path, monkeypatch, tiny):
    from easel.net.fetch import FetchPolicy, fetch_to_file

    url = f"{env.url}/api/download/models/657897"
    sources = _sources(tmp_path, {"554": {"source": {"type": "url", "url": url}}})
    weights = sources.checkpoint(sources.catalog.get("554"))
    assert weights.format == "single_file" and weights.path.read_bytes() == Path(tiny["sdxl-single-file"]).read_bytes()
    # a token (CIVITAI_TOKEN for civitai.com) goes to the download API's host, never to the storage host
    policy = FetchPolicy(allow=("127.0.0.1", "localhost"), max_bytes=1 << 30)
    fetch_to_file(url, tmp_path / "x.safetensors", policy, headers={"Authorization": "Bearer civ-secret"})
    assert env.auth_seen["/api/download/models/657897"] == "Bearer civ-secret"
    assert env.auth_seen["/storage/657897"] == ""
    pinned = _sources(tmp_path / "b", {"554": {"source": {"type": "url", "url": url, "sha256": "1" * 64}}})
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        pinned.checkpoint(pinned.catalog.get("554"))


def _is_duplicate(path: str) -> bool:
    return (path.endswith((".ckpt", ".msgpack", ".pth")) or ".fp16." in path or "safety_checker" in path
            or "/onnx/" in path or path.endswith(("sd_xl_base_1.0.safetensors", "flux1-dev.safetensors", "/ae.safetensors"))
            or (path.endswith(".bin") and not path.endswith("InstantX/InstantID/ip-adapter.bin")))


def _easel(env_vars: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "easel", "models", *args], capture_output=True, text=True,
                          env={**os.environ, **env_vars}, timeout=600)


def test_models_pull_seeds_fetches_exactly_the_files_the_seeds_pipelines_load(env, tmp_path):
    """`easel models set` an operator's Comics Factory LoRA, then `easel models pull --seeds`
    fetches every file the five seed requests load, none twice and no duplicate copy; `easel
    models list --json` then shows them local."""
    env_vars = {"HF_ENDPOINT": env.url, "HF_TOKEN": "hf_test_token", "EASEL_DATA_DIR": str(tmp_path),
                "EASEL_DOWNLOAD_RESERVE_BYTES": "0"}
    out = _easel(env_vars, "set", "comics-factory-v1", "--hf", "easel-test/comics-factory-v1:comics_factory_v1.safetensors")
    assert out.returncode == 0, out.stderr
    refused = _easel(env_vars, "pull", "flux.1-dev")
    assert refused.returncode == 1 and "--accept-license flux.1-dev" in refused.stdout.replace("\n", "")
    out = _easel(env_vars, "pull", "--seeds", "--accept-license", "all")
    assert out.returncode == 0, out.stdout + out.stderr
    fetched = env.fetched()
    assert len(fetched) == len(set(fetched)) and [p for p in fetched if _is_duplicate(p)] == []
    for must in ("CompVis/stable-diffusion-v1-4/unet/diffusion_pytorch_model.safetensors",
                 "black-forest-labs/FLUX.1-dev/transformer/diffusion_pytorch_model.safetensors",
                 "easel-test/comics-factory-v1/comics_factory_v1.safetensors", "briaai/RMBG-1.4/model.safetensors",
                 "InstantX/InstantID/ControlNetModel/diffusion_pytorch_model.safetensors",
                 "DIAMONIK7777/antelopev2/glintr100.onnx", "lllyasviel/ic-light/iclight_sd15_fbc.safetensors"):
        assert must in fetched
    assert not any("pixel-art" in p or "RealismLora" in p for p in fetched)  # the seeds ask for no LoRA
    listed = {r["id"]: r for r in json.loads(_easel(env_vars, "list", "--json").stdout)}
    assert all(listed[m]["local"] for m in SEED_IDS + ("comics-factory-v1",))
    assert listed["61"]["source"] is None and "easel models set 61" in listed["61"]["why"]
    assert listed["dpt-hybrid-midas"]["source"]["revision"] == "refs/pr/5" and not listed["454"]["local"]


def test_models_list_piped_prints_whole_values_with_the_licence_to_accept(tmp_path):
    """Piped (no terminal), `easel models list` prints one tab-separated line per id with whole
    values: the repo and file, and the licence with the name to accept (a table would cut them to
    80 columns, and Rich markup would swallow a bracketed note)."""
    out = _easel({"EASEL_DATA_DIR": str(tmp_path)}, "list")
    assert out.returncode == 0, out.stderr
    lines = {line.split("\t")[0]: line.split("\t") for line in out.stdout.splitlines()}
    assert lines["id"] == ["id", "kind", "source", "licence", "size", "local"]
    assert lines["655"][2] == "XLabs-AI/flux-RealismLora:lora.safetensors"
    assert lines["655"][3].endswith("(accept: flux.1-dev)") and lines["655"][5] == "no"
    assert lines["61"][2] == "none: easel models set"


def test_seed_defaults_that_name_no_listed_option_and_empty_selections_mean_no_lora():
    from easel.catalog import load_tools
    from easel.weights.needs import SEED_REQUESTS, run_needs

    tools, catalog = load_tools(), ModelCatalog.load()
    instantid, flux, sd = (tools[t] for t in ("wiro/instant-id-controlnet-lora", "wiro/text-to-image-flux-lora-fast",
                                               "wiro/text-to-image-sd-lora"))
    assert run_needs(instantid, SEED_REQUESTS[instantid.name], catalog) == [
        "79", "instantid-identitynet", "instantid-ip-adapter", "antelopev2"]  # no pixel-art-xl (80)
    assert run_needs(flux, {}, catalog) == ["flux.1-dev"]  # default 655 is no listed option
    assert run_needs(flux, {"selectedLoraModel": "655"}, catalog) == ["655", "flux.1-dev"]  # asked for: applied
    assert run_needs(sd, {"selectedLoraModel": []}, catalog) == ["1"]
    assert run_needs(sd, {}, catalog) == ["1", "61"]  # a listed default stays
    assert run_needs(instantid, {"selectedLoraModel": "80", "selectedControlnetModel": "458,455"}, catalog) == [
        "79", "80", "458", "455", "instantid-identitynet", "instantid-ip-adapter", "antelopev2",
        "openpose-annotators", "dpt-hybrid-midas"]


def test_a_full_disk_during_the_download_ends_clearly_without_a_partial_file(env, tmp_path):
    """The disk fills up mid-file (here: a file-size limit, RLIMIT_FSIZE, makes writes past 1 MB fail
    as a full disk does): the download ends with a message saying so and no part is left."""
    script = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
from easel.catalog import ModelCatalog
from easel.config import Settings
from easel.weights.sources import ModelSources
s = ModelSources(Settings(data_dir={str(tmp_path)!r}, model_source="hub", download_reserve_bytes=0), ModelCatalog.load())
try:
    s.checkpoint(s.catalog.get("632"))
except Exception as exc:
    print(type(exc).__name__, exc)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_ENDPOINT": env.url})
    assert "DownloadError" in out.stdout and "could not write" in out.stdout and "is the disk full?" in out.stdout, \
        out.stdout + out.stderr
    _no_partials(tmp_path)
    folder = tmp_path / "models" / "hub" / "models--ItsJayQz--GTA5_Artwork_Diffusion" / "main"
    assert not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
