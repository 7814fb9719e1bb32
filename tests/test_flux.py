"""The two FLUX.1 tools through the real server (tiny FLUX.1, one local worker)."""
from __future__ import annotations

import io

import httpx
import pytest
from PIL import Image

from conftest import pixels, png_size

FLUX = "wiro/text-to-image-flux-lora-fast"
COMICS = "Adel_AI/Comics-Factory-v1"
PROMPT = "ComicsFact1 style. a detective under a street lamp"
# "655" (XLabs-AI/flux-RealismLora) is the seed's default but no listed option: it applies only when asked for
FLUX_SMALL = {"prompt": PROMPT, "samples": 1, "steps": 3, "scale": 3.5, "seed": "7", "width": 64, "height": 64,
              "selectedLoraModel": "655"}


def run_flux(server, project, params, tool=FLUX):
    task = server.wait(project, server.run(project, params, tool=tool)["taskid"])
    return task


def ok_images(server, task, n, size):
    assert task["pexit"] == "0", task["debugerror"]
    images = server.images(task)
    assert len(images) == n and all(png_size(b) == size for b in images)
    return images


def test_flux_tool_runs_with_requested_count_and_size(server, project):
    task = run_flux(server, project, {**FLUX_SMALL, "samples": 2, "width": 96, "height": 64})
    images = ok_images(server, task, 2, (96, 64))
    assert pixels(images)[0] != pixels(images)[1]  # seeds 7 and 8
    meta = Image.open(io.BytesIO(images[0])).text
    assert "Seed: 7" in meta["parameters"] and "XLabs-AI/flux-RealismLora:1" in meta["parameters"]


def test_comics_factory_runs_and_equals_flux_tool_with_same_lora(server, project, file_server):
    comics = run_flux(server, project, {**FLUX_SMALL, "samples": 2}, tool=COMICS)
    comics_images = ok_images(server, comics, 2, (64, 64))
    base, _ = file_server
    # The tiny Comics style LoRA is the tiny PEFT-layout Flux LoRA; the private URL replaces the catalog LoRA at scale 1.
    same = run_flux(server, project, {**FLUX_SMALL, "samples": 2,
                                      "selectedLoraModelPrivateUrl": f"{base}/flux-lora-peft.safetensors"})
    assert pixels(ok_images(server, same, 2, (64, 64))) == pixels(comics_images)
    other = run_flux(server, project, {**FLUX_SMALL, "samples": 2})
    assert pixels(ok_images(server, other, 2, (64, 64))) != pixels(comics_images)


def test_comics_after_the_flux_default_is_hot_swapped_with_a_clean_debugerror(server, project):
    """The seed's Comics Factory task after a FLUX task with its default LoRA (XLabs RealismLora,
    double-block attention only) hot-swaps its style LoRA (single blocks too) into the slot:
    no reload (a compiled transformer would recompile), and no diffusers ERROR line in debugerror."""
    ok_images(server, run_flux(server, project, FLUX_SMALL), 1, (64, 64))
    comics = run_flux(server, project, FLUX_SMALL, tool=COMICS)
    ok_images(server, comics, 1, (64, 64))
    assert "hot-swapped" in comics["debugoutput"], comics["debugoutput"]
    assert "unsuccessful" not in comics["debugerror"] and "ERROR" not in comics["debugerror"], comics["debugerror"]


def test_lora_scale_zero_equals_the_plain_flux_pipeline(server, project):
    import torch
    from diffusers import FluxPipeline

    task = run_flux(server, project, {**FLUX_SMALL, "flux-RealismLora": "0"})
    served = pixels(ok_images(server, task, 1, (64, 64)))
    with_lora = pixels(ok_images(server, run_flux(server, project, FLUX_SMALL), 1, (64, 64)))
    assert served != with_lora
    pipe = FluxPipeline.from_pretrained(str(server.data_dir / "models" / "tiny" / "flux"))
    pipe.set_progress_bar_config(disable=True)
    raw = pipe(PROMPT, num_inference_steps=3, guidance_scale=3.5, width=64, height=64,
               generator=[torch.Generator("cpu").manual_seed(7)]).images[0]
    assert served == [raw.convert("RGB").tobytes()]


@pytest.mark.parametrize("layout", ["peft", "kohya", "xlabs", "bfl"])
def test_each_flux_lora_layout_loads_and_changes_the_output(server, project, file_server, layout):
    base, _ = file_server
    plain = pixels(ok_images(server, run_flux(server, project, {**FLUX_SMALL, "flux-RealismLora": "0"}), 1, (64, 64)))
    task = run_flux(server, project, {**FLUX_SMALL, "selectedLoraModelPrivateUrl": f"{base}/flux-lora-{layout}.safetensors"})
    assert pixels(ok_images(server, task, 1, (64, 64))) != plain
    assert f"({layout} layout)" in task["debugoutput"]
    if layout != "peft":  # diffusers warns that these files hold no text-encoder keys: a note, not an error
        assert "No LoRA keys associated to CLIPTextModel" in task["debugoutput"]
        assert "No LoRA keys associated to CLIPTextModel" not in task["debugerror"]


def test_switching_lora_between_tasks_keeps_the_base_model(server, project, file_server):
    base, _ = file_server
    first = run_flux(server, project, FLUX_SMALL)
    ok_images(server, first, 1, (64, 64))
    second = run_flux(server, project, {**FLUX_SMALL, "selectedLoraModelPrivateUrl": f"{base}/flux-lora-kohya.safetensors"})
    ok_images(server, second, 1, (64, 64))
    third = run_flux(server, project, {**FLUX_SMALL, "seed": "9"}, tool=COMICS)
    ok_images(server, third, 1, (64, 64))
    for task in (second, third):
        assert "base model black-forest-labs/FLUX.1-dev: resident, reused" in task["debugoutput"], task["debugoutput"]
        assert "loaded in" not in task["debugoutput"]


def test_sd15_lora_on_the_flux_tool_fails_clearly(server, project, file_server):
    base, _ = file_server
    task = run_flux(server, project, {**FLUX_SMALL, "selectedLoraModelPrivateUrl": f"{base}/sd15-lora-kohya.safetensors"})
    assert task["pexit"] not in ("0", "")
    assert "Stable Diffusion UNet" in task["debugerror"] and "FLUX.1" in task["debugerror"]
    assert task["outputs"] == []


def test_unknown_lora_layout_is_named(server, project, file_server):
    base, _ = file_server
    task = run_flux(server, project, {**FLUX_SMALL, "selectedLoraModelPrivateUrl": f"{base}/unknown-layout.safetensors"})
    assert task["pexit"] == "1"
    assert "unknown LoRA key layout" in task["debugerror"] and "mystery.block.lora_left" in task["debugerror"]


@pytest.mark.parametrize("field,value", [("width", 1000), ("height", 72)])
def test_off_grid_sizes_are_rejected_naming_the_field(server, project, field, value):
    r = server.post(project, f"/v1/Run/{FLUX}", json={**FLUX_SMALL, field: value})
    body = r.json()
    assert body["result"] is False
    assert body["errors"][0]["message"] == (
        f"Request parameter [{field}] must be a multiple of 16 between 64 and 2048 (got {value})")


def test_flux_tool_with_torch_compile(tmp_path, file_server):
    from conftest import Server

    base, _ = file_server
    srv = Server(tmp_path, env={"EASEL_TORCH_COMPILE": "1"}).start()
    try:
        p = srv.project()
        first = srv.wait(p, srv.run(p, FLUX_SMALL, tool=FLUX)["taskid"])
        second = srv.wait(p, srv.run(p, {**FLUX_SMALL, "selectedLoraModelPrivateUrl": f"{base}/flux-lora-bfl.safetensors"},
                                     tool=FLUX)["taskid"])
        for task in (first, second):
            ok_images(srv, task, 1, (64, 64))
        assert "hot-swapped" in second["debugoutput"] or "slot reloaded" in second["debugoutput"]
        # the worker's counters reach the API's /metrics (multiprocess mode)
        metrics = httpx.get(f"{srv.base}/metrics", timeout=30).text
        swapped = "hot-swapped" in second["debugoutput"]
        assert f"easel_lora_hotswaps_total {1.0 if swapped else 0.0}" in metrics.splitlines()
        assert 'easel_tasks_total{status="succeeded",tool="wiro/text-to-image-flux-lora-fast"} 2.0' in metrics
    finally:
        srv.stop()
