"""The image-tool runtime: Files API (through the real server), image decoding rules, adapter state
per module, derived pipelines and components in the cache, progress phases, extra outputs."""
from __future__ import annotations

import gc
import io
import time

import httpx
import pytest
from PIL import Image

from easel.catalog import ModelCatalog
from easel.config import Settings
from easel.images import ImageInputError, decode, probe


def png(size=(32, 24), color=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else (*color, 128)).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width=60000, height=60000) -> bytes:
    """A valid PNG header declaring a huge canvas, with a tiny (truncated) body."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


# -- Files API through the server --------------------------------------------------------------

def upload(server, project, name: str, data: bytes, **fields) -> httpx.Response:
    return server.post(project, "/v1/File/Upload", files={"file": (name, data)}, data=fields)


def test_upload_answers_wiros_list_and_serves_the_file(server, project):
    data = png()
    r = upload(server, project, "bg img2.png", data)
    body = r.json()
    assert r.status_code == 200 and body["result"] is True and body["errors"] == []
    (item,) = body["list"]
    assert set(item) >= {"id", "name", "contenttype", "size", "parentid", "url", "addedtime", "accesskey"}
    assert item["name"] == "bg_img2.png" and item["contenttype"] == "image/png" and item["size"] == str(len(data))
    assert item["url"].endswith(f"/v1/File/{item['accesskey']}/bg_img2.png")
    assert httpx.get(item["url"], timeout=10).content == data
    # the default folder is the same for every upload of the project
    again = upload(server, project, "x.png", data).json()["list"][0]
    assert again["parentid"] == item["parentid"] and again["id"] != item["id"]


def test_folder_create_and_upload_into_it(server, project):
    r = server.post(project, "/v1/File/FolderCreate", json={"name": "training-data"}).json()
    assert r["result"] is True
    folder = r["list"][0]
    assert folder["name"] == "training-data" and folder["size"] == "0" and folder["contenttype"] == ""
    sub = server.post(project, "/v1/File/FolderCreate", json={"name": "sub_1", "parentid": folder["id"]}).json()
    assert sub["list"][0]["parentid"] == folder["id"]
    item = upload(server, project, "a.png", png(), folderid=folder["id"]).json()["list"][0]
    assert item["parentid"] == folder["id"]
    bad = server.post(project, "/v1/File/FolderCreate", json={"name": "no spaces!"}).json()
    assert bad["result"] is False and "[name]" in bad["errors"][0]["message"]


def test_upload_refusals_name_the_field(server, project):
    other = server.project()
    folder = server.post(other, "/v1/File/FolderCreate", json={"name": "theirs"}).json()["list"][0]
    r = upload(server, project, "a.png", png(), folderid=folder["id"]).json()
    assert r["result"] is False and "[folderid]" in r["errors"][0]["message"]
    r = upload(server, project, "run.exe", b"MZ").json()
    assert r["result"] is False and "[file]" in r["errors"][0]["message"] and "png" in r["errors"][0]["message"]
    r = server.post(project, "/v1/File/Upload", data={"folderid": ""}).json()
    assert r["result"] is False and "[file]" in r["errors"][0]["message"]


def test_upload_size_limit(tmp_path):
    from conftest import Server

    srv = Server(tmp_path, env={"EASEL_UPLOAD_MAX_BYTES": "1000", "EASEL_WORKERS": "0"},
                 extra_args=("--workers", "0")).start()
    try:
        project = srv.project()
        r = upload(srv, project, "big.png", b"\0" * 5000).json()
        assert r["result"] is False and "1000" in r["errors"][0]["message"]
        assert upload(srv, project, "small.png", png()).json()["result"] is True
    finally:
        srv.stop()


# -- decoding rules ------------------------------------------------------------------------------

def test_decode_applies_exif_orientation_and_normalises_modes():
    img = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    out = decode(buf.getvalue(), "inputImageUrl", 10**6)
    assert out.size == (20, 40) and out.mode == "RGB"
    assert decode(png(mode="RGBA"), "f", 10**6).mode == "RGBA"
    grey = io.BytesIO()
    Image.new("L", (8, 8), 100).save(grey, "WEBP")
    assert decode(grey.getvalue(), "f", 10**6).mode == "RGB"


def test_decompression_bomb_and_pixel_limit_are_refused_from_the_header():
    t0 = time.perf_counter()
    with pytest.raises(ImageInputError) as e:
        probe(bomb_png(), "inputImage2Url", 4096 * 4096)
    assert "[inputImage2Url]" in e.value.message and time.perf_counter() - t0 < 1.0
    with pytest.raises(ImageInputError) as e:
        decode(bomb_png(5000, 5000), "inputImageUrl", 4096 * 4096)
    assert "25000000 pixels" in e.value.message and "EASEL_MAX_IMAGE_PIXELS" in e.value.message
    assert probe(png((64, 32)), "f", 64 * 32) == (64, 32, "png")
    with pytest.raises(ImageInputError):
        probe(png((64, 32)), "f", 64 * 32 - 1)


def test_not_an_image_is_refused():
    for data in (b"hello world", b"GIF89a" + b"\0" * 20, b"%PDF-1.4"):
        with pytest.raises(ImageInputError) as e:
            decode(data, "inputImageUrl", 10**6)
        assert "[inputImageUrl] is not an image" in e.value.message and "webp" in e.value.message


# -- model services ------------------------------------------------------------------------------

def test_adapter_state_belongs_to_the_module_not_the_pipeline_id(tmp_path, tiny):
    from easel.weights import ModelManager
    from easel.weights.sources import Weights
    from easel.tools.sd_lora import load_pipeline

    manager = ModelManager(Settings(data_dir=tmp_path), ModelCatalog.load())
    pipe = load_pipeline(Weights("diffusers", tiny["sd15"]))
    manager.adapters(pipe).apply(pipe, [("a", str(tiny["sd15-lora-kohya"]), 1.0)])
    assert manager.adapters(pipe).loads == 1
    twin = type(pipe)(**pipe.components)  # another pipeline object around the same UNet shares its adapters
    assert manager.adapters(twin) is manager.adapters(pipe)
    old_id = id(pipe)
    del pipe, twin
    gc.collect()
    fresh = load_pipeline(Weights("diffusers", tiny["sd15"]))  # may reuse the old id
    state = manager.adapters(fresh)
    assert state.loads == 0 and not getattr(fresh.unet, "peft_config", None), old_id
    assert len(manager._adapters) == 1  # the dead module's state went with it


def test_derived_pipelines_and_components_are_cached_budgeted_and_never_shared(tmp_path, tiny):
    import torch

    from easel.weights import ModelManager
    from easel.weights.sources import Weights
    from easel.tools.sd_lora import load_pipeline

    manager = ModelManager(Settings(data_dir=tmp_path), ModelCatalog.load())
    w = Weights("diffusers", tiny["sd15"], key="tiny-sd15")
    base = manager.base_pipeline("sd15", w, lambda: load_pipeline(w))
    assert base.fresh and not manager.base_pipeline("sd15", w, lambda: load_pipeline(w)).fresh
    derived = manager.derived_pipeline("sd15", w, "t1", lambda: load_pipeline(w))
    assert derived.obj is not base.obj and derived.obj.unet is not base.obj.unet
    assert manager.pipelines.used_bytes > 1.9 * manager.pipelines.peek("sd15:tiny-sd15+t1") .unet.num_parameters() * 4
    with pytest.raises(RuntimeError):  # a "derived" entry reusing the plain pipeline's modules is refused
        manager.derived_pipeline("sd15", w, "bad", lambda: type(base.obj)(**base.obj.components))
    calls = []

    def make(weights):
        calls.append(weights)
        return torch.nn.Linear(4, 4)

    cw = Weights("component", tiny["sd15-lora-peft"], key="c1")
    first = manager.component("matting", cw, make)
    assert manager.component("matting", cw, make).obj is first.obj and len(calls) == 1
    assert manager.loads()["component:matting:c1"] == 1


def test_phases_make_one_bar_and_name_the_phase():
    from easel.tools.base import Phases

    seen = []

    class Ctx:
        def progress(self, step, total, preview=None, task="Generate"):
            seen.append((step, total, task))

        def wants_preview(self, step, total):
            return step == total

    bar = Phases(Ctx(), [("Matting", 1), ("Low-res pass", 2), ("High-res pass", 3)])
    bar.step("Matting")
    for _ in range(2):
        bar.step("Low-res pass")
    for _ in range(3):
        assert bar.wants_preview() == (bar.done == 5)
        bar.step("High-res pass")
    assert seen == [(1, 6, "Matting"), (2, 6, "Low-res pass"), (3, 6, "Low-res pass"), (4, 6, "High-res pass"),
                    (5, 6, "High-res pass"), (6, 6, "High-res pass")]
