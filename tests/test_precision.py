"""Precision (``easel.weights.precision``): the device/dtype table, the ``cpu_precision`` setting,
and the tools through a real worker on the tiny models with ``cpu_precision = "half"``, i.e.
in the dtypes CUDA runs them in (fp16 SD 1.5 / SDXL / InstantID, bf16 FLUX, fp16 IC-Light UNet with
a bf16 VAE), on the CPU: networks in the expected dtypes, real images, same seed → same pixels,
previews, and no LoRA or adapter state left behind between tasks.

The table's blocks and the example runs are built from the registered tools' declarations
(``easel.tools.registry``): a new tool is covered without editing this file. The built-in tools'
own checks (LoRA layers, the Comics preset, IC-Light's VAE, InstantID's upcast VAE) follow."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import pixels
from easel.config import Settings
from easel.weights.precision import Precision, catalog_dtypes, generators, precision
from easel.storage import output_key
from easel.tasks import lifecycle as lc
from easel.tools.registry import dtype_kinds, families, tools

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


# -- the table, built from the declarations ----------------------------------------------------

@pytest.mark.parametrize("kind", sorted(dtype_kinds()))
def test_every_declared_kind_runs_in_its_declared_dtypes(kind, monkeypatch):
    import easel.weights.precision as mod

    row = dtype_kinds()[kind]
    dtype, vae_dtype = getattr(torch, row.dtype), getattr(torch, row.vae_dtype)
    assert catalog_dtypes(kind) == (dtype, vae_dtype)
    monkeypatch.setattr(mod, "cuda_available", lambda: False)
    assert precision(kind) == Precision("cpu", F32, F32, row.vae_upcast)
    assert precision(kind, "half") == Precision("cpu", dtype, vae_dtype, row.vae_upcast)
    monkeypatch.setattr(mod, "cuda_available", lambda: True)
    for setting in ("float32", "half"):  # the setting is about CPUs only
        assert precision(kind, setting) == Precision("cuda", dtype, vae_dtype, row.vae_upcast)


def test_every_family_is_a_precision_kind_and_every_tool_declares_a_registered_family():
    assert set(families()) <= set(dtype_kinds())
    for tool in tools().values():
        assert all(families()[f.name] == f for f in tool.declaration.families), tool.name


# -- the table and the setting -----------------------------------------------------------------

def test_the_built_in_rows_are_the_reference_dtypes_and_unknown_kinds_or_settings_are_refused(monkeypatch):
    import easel.weights.precision as mod

    monkeypatch.setattr(mod, "cuda_available", lambda: False)
    assert precision("ic-light", "half") == Precision("cpu", F16, BF16)
    assert precision("flux", "half") == Precision("cpu", BF16, BF16)
    assert precision("sd15", "half") == Precision("cpu", F16, F16)
    assert precision("sdxl", "half") == precision("instantid", "half") == Precision("cpu", F16, F16, vae_upcast=True)
    assert precision("condition", "half").dtype == F16 and precision("matting", "half").dtype == F32
    with pytest.raises(ValueError, match="unknown precision kind 'sd3'"):
        precision("sd3")
    with pytest.raises(ValueError, match="cpu_precision must be one of float32, half"):
        precision("sd15", "fp16")
    assert catalog_dtypes("sdxl") == (F16, F16)
    upcast, no_upcast = (type("Vae", (), {"config": type("C", (), {"force_upcast": f})()})() for f in (True, False))
    assert precision("sdxl", "half").vae_dtype_for(upcast) == F32  # the SDXL VAE
    assert precision("sdxl", "half").vae_dtype_for(no_upcast) == F16  # e.g. an fp16-fixed VAE
    assert precision("sd15", "half").vae_dtype_for(upcast) == F16  # SD 1.5 decodes in fp16 (config default: True)


def test_cpu_precision_setting_is_read_from_the_environment_and_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("EASEL_CPU_PRECISION", "half")
    settings = Settings.from_env(data_dir=tmp_path)
    assert settings.weights.cpu_precision == "half"
    from easel.catalog import ModelCatalog
    from easel.weights import ModelManager

    if not torch.cuda.is_available():
        assert ModelManager(settings, ModelCatalog.load(None)).precision("flux") == Precision("cpu", BF16, BF16)
    with pytest.raises(ValueError, match="cpu_precision"):
        Settings(data_dir=tmp_path, cpu_precision="bf16")


def test_generators_are_cpu_generators_seeded_seed_plus_i():
    gens = generators(41, 3)
    assert [g.device.type for g in gens] == ["cpu"] * 3
    assert [g.initial_seed() for g in gens] == [41, 42, 43]


# -- the tools in half precision on the CPU, through a worker ----------------------------------

@pytest.fixture(scope="module")
def half(tmp_path_factory, tiny, file_server):
    """A worker with ``cpu_precision="half"`` (previews at every step), its project, and the file server."""
    from easel.tasks.runner import Worker

    s = Settings(data_dir=tmp_path_factory.mktemp("half"), cpu_precision="half", fetch_allow=("127.0.0.1",),
                 preview_interval=1)
    s.core.models_dir.mkdir(parents=True, exist_ok=True)
    (s.core.models_dir / "tiny").symlink_to(next(iter(tiny.values())).parent)  # the session's tiny models
    worker = Worker(s, "w-half")
    worker.store.migrate()
    (file_server[1] / "sdxl-lora-peft.safetensors").write_bytes(Path(tiny["sdxl-lora-peft"]).read_bytes())
    return worker, worker.store.create_project("half"), file_server


def _run(half, tool: str, inputs: dict) -> tuple[list[bytes], list, object]:
    """Run one task to its end (``pexit`` "0"); its images, its stored previews and the task."""
    from easel.catalog import load_tools

    worker, project, _ = half
    valid = load_tools()[tool].validate(inputs, worker.catalog)
    task, _ = lc.submit(worker.store, project_id=project.id, tool=tool, parameters=inputs, inputs=valid,
                        callbackurl="", cost_per_second=0.0)
    assert worker.run_next() == task.id
    done = worker.store.get_task(task.id)
    assert done.pexit == "0", done.debugerror
    images = [worker.storage.get_bytes(output_key(o.path)) for o in worker.store.outputs(task.id)]
    return images, worker.store.previews(task.id), done


def _resident(half, prefix: str, within: str = ""):
    """The resident cache entry whose key starts with ``prefix`` and holds ``within`` (a derived
    pipeline's transformation); without ``within``, a plain pipeline (no ``+`` in its key)."""
    worker = half[0]
    keys = [k for k in worker.models.pipelines.keys()
            if k.startswith(prefix) and (within in k if within else "+" not in k)]
    assert keys, worker.models.pipelines.keys()
    return worker.models.pipelines.peek(keys[0])


def _dtypes(module) -> set:
    return {p.dtype for p in module.parameters() if p.is_floating_point()}


def _real(images: list[bytes], size=None) -> None:
    """Every image decodes, has ``size`` and is not one flat colour (no NaN/inf turned black)."""
    for data in images:
        arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert size is None or arr.shape[:2] == (size[1], size[0])
        assert arr.std() > 1.0, "a constant image: the half-precision path produced NaN or inf"


def _jpegs(previews, n: int) -> None:
    assert len(previews) == n
    assert all(Image.open(io.BytesIO(p.data)).format == "JPEG" for p in previews)


def _example(name: str) -> dict:
    """The tool's example request (its catalog file's ``example``), or a skip saying it has none
    or that it reads images (those tools' own blocks below run them)."""
    from easel.catalog import load_tools

    spec = load_tools()[name]
    if spec.example is None:
        pytest.skip(f"{name}: no example request in its catalog file")
    if any(i.accepts == "image" for i in spec.inputs):
        pytest.skip(f"{name}: its example reads images (run by its own block below)")
    # the request as the seed sends it, made small: one sample, two steps, the family's least size
    small = {"samples": 1, "steps": 2, "width": 64, "height": 64}
    names = {i.name for i in spec.inputs}
    return {**spec.example.request, **{k: v for k, v in small.items() if k in names}}


@pytest.mark.parametrize("name", sorted(tools()))
def test_every_tool_runs_its_example_in_its_family_dtypes(half, name):
    example = _example(name)
    family = tools()[name].declaration.family
    images, previews, _ = _run(half, name, example)
    _real(images)
    entry = _resident(half, f"{family.name}:")
    pipe = getattr(entry, "pipe", entry)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    assert _dtypes(denoiser) == {getattr(torch, family.precision.dtype)}, name
    if family.preview is None:
        assert previews == []
    assert pixels(_run(half, name, example)[0]) == pixels(images)  # same seed, same pixels


SD = "wiro/text-to-image-sd-lora"
SD_SMALL = {"prompt": "a red fish", "negativePrompt": "blurry", "samples": 2, "steps": 2, "width": 64, "height": 64,
            "seed": "5", "selectedLoraModel": [], "clipSkip": 0}


def test_sd_tool_in_half_precision(half):
    plain, previews, _ = _run(half, SD, SD_SMALL)
    _real(plain, (64, 64))
    _jpegs(previews, 2)
    pipe = _resident(half, "sd15:")
    assert pipe.unet.device.type == precision("sd15", "half").device  # the CPU here; CUDA where there is one
    assert _dtypes(pipe.unet) == _dtypes(pipe.text_encoder) == _dtypes(pipe.vae) == {F16}
    assert pixels(_run(half, SD, SD_SMALL)[0]) == pixels(plain)
    # two LoRAs (Kohya + PEFT layouts) and clip skip: the LoRA layers are fp16 like the UNet, nothing leaks
    base_url = half[2][0]
    styled, _, _ = _run(half, SD, {**SD_SMALL, "selectedLoraModel": [61], "clipSkip": 1,
                                "selectedLoraModelPrivateUrl": f"{base_url}/sd15-lora-peft.safetensors"})
    _real(styled)
    assert _dtypes(pipe.unet) == {F16} and any("lora_A" in n for n, _ in pipe.unet.named_parameters())
    assert pixels(styled) != pixels(plain)
    assert pixels(_run(half, SD, SD_SMALL)[0]) == pixels(plain)


FLUX = "wiro/text-to-image-flux-lora-fast"
COMICS = "Adel_AI/Comics-Factory-v1"
FLUX_SMALL = {"prompt": "ComicsFact1 style. a detective", "samples": 1, "steps": 2, "scale": 3.5, "seed": "7",
              "width": 64, "height": 64, "selectedLoraModel": "655"}  # 655: asked for (no listed option)


def test_flux_tools_in_bfloat16(half):
    from diffusers import FluxPipeline

    worker, _, (base_url, _) = half
    no_lora = {**FLUX_SMALL, "flux-RealismLora": "0"}
    plain, previews, _ = _run(half, FLUX, no_lora)
    _real(plain, (64, 64))
    _jpegs(previews, 2)
    pipe = _resident(half, "flux:")
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        assert _dtypes(getattr(pipe, name)) == {BF16}, name
    with_lora = _run(half, FLUX, FLUX_SMALL)[0]  # XLabs-AI/flux-RealismLora, hot-swap slot in bf16
    assert _dtypes(pipe.transformer) == {BF16} and pixels(with_lora) != pixels(plain)
    assert pixels(_run(half, FLUX, no_lora)[0]) == pixels(plain)
    # scale 0 equals a plain diffusers FluxPipeline in bf16 with the same CPU generator: the zeroed slot adds nothing
    raw = FluxPipeline.from_pretrained(str(worker.settings.core.models_dir / "tiny" / "flux"), dtype=BF16)
    raw.to(precision("flux", "half").device)
    raw.set_progress_bar_config(disable=True)
    image = raw(FLUX_SMALL["prompt"], num_inference_steps=2, guidance_scale=3.5, width=64, height=64,
                generator=generators(7)).images[0]
    assert pixels(plain) == [image.convert("RGB").tobytes()]
    # the Comics preset equals the FLUX tool with the same LoRA file, both in bf16
    comics, _, _ = _run(half, COMICS, FLUX_SMALL)
    _real(comics)
    same = _run(half, FLUX, {**FLUX_SMALL, "selectedLoraModelPrivateUrl": f"{base_url}/flux-lora-peft.safetensors"})[0]
    assert pixels(comics) == pixels(same) != pixels(plain)


IC_LIGHT = "wiro/ic-light-background"


def test_ic_light_in_half_precision_with_its_bfloat16_vae(half):
    from test_ic_light import BG, FG, QUICK

    _, _, (base_url, folder) = half
    (folder / "half-fg.png").write_bytes(FG)
    (folder / "half-bg.jpg").write_bytes(BG)
    body = {**QUICK, "steps": 2, "inputImageUrl": f"{base_url}/half-bg.jpg",
            "inputImage2Url": f"{base_url}/half-fg.png"}
    sd_before = _run(half, SD, {**SD_SMALL, "samples": 1})[0]
    images, previews, _ = _run(half, IC_LIGHT, body)
    _real(images, (128, 192))
    _jpegs(previews, 2 + 2)  # low-res steps + high-res steps (round(2 / 0.5) = 4 scheduled, 2 run); matting has none
    pipe = _resident(half, "sd15:tiny-sd15", "+iclight")
    assert _dtypes(pipe.unet) == _dtypes(pipe.text_encoder) == {F16} and _dtypes(pipe.vae) == {BF16}
    assert pipe.unet.conv_in.in_channels == 12
    assert _dtypes(_resident(half, "component:matting")) == {F32}  # RMBG stays float32, as the reference
    assert pixels(_run(half, IC_LIGHT, body)[0]) == pixels(images)
    assert pixels(_run(half, SD, {**SD_SMALL, "samples": 1})[0]) == pixels(sd_before)  # the SD model is untouched


INSTANTID = "wiro/instant-id-controlnet-lora"
ID_SMALL = {"selectedModel": "79", "selectedLoraModel": "", "selectedControlnetModel": "458,455,454",
            "prompt": "a portrait", "negativePrompt": "blurry", "steps": "2", "scale": "5.0", "ip_adapter_scale": "0.8",
            "samples": "1", "seed": "7", "scheduler": "DDIMScheduler"}


def test_instantid_in_half_precision_decodes_the_sdxl_vae_in_float32(half):
    from test_instantid_server import _photo_bytes

    from easel.pipelines.instantid import IPAttnProcessor

    _, _, (base_url, folder) = half
    (folder / "half-portrait.png").write_bytes(_photo_bytes())
    body = {**ID_SMALL, "inputImageUrl": f"{base_url}/half-portrait.png"}
    zero = {**body, "selectedLoraModel": "80", "pixel-art-xl": "0"}  # pixel-art-xl (catalog 80) at scale 0: it adds nothing
    plain, _, task = _run(half, INSTANTID, zero)
    _real(plain, (120, 160))
    assert "FutureWarning" not in task.debugerror and "cannot run" not in task.debugerror, task.debugerror
    entry = _resident(half, "sdxl:", "+instantid:")
    pipe = entry.pipe
    assert _dtypes(pipe.unet) == _dtypes(pipe.text_encoder) == _dtypes(pipe.text_encoder_2) == {F16}
    procs = [p for p in pipe.unet.attn_processors.values() if isinstance(p, IPAttnProcessor)]
    assert procs and all(_dtypes(p) == {F16} for p in procs)
    assert _dtypes(entry.adapter.image_proj) == {F16}
    worker = half[0]
    for key in worker.models.pipelines.keys():
        if key.startswith(("component:controlnet:", "component:depth:", "component:openpose:")):
            obj = worker.models.pipelines.peek(key)
            net = getattr(obj, "net", None) or obj.fn.model
            # controlnet_aux's OpenPose body network stays float32: the library builds float32 inputs
            assert _dtypes(net) == ({F32} if key.startswith("component:openpose:") else {F16}), key
    # the SDXL VAE's config says force_upcast: it is held in float32 and decodes the fp16 latents in float32
    assert pipe.vae.config.force_upcast and _dtypes(pipe.vae) == {F32}
    seen = []
    hook = pipe.vae.decoder.register_forward_pre_hook(
        lambda module, args: seen.append((args[0].dtype, next(module.parameters()).dtype)))
    try:
        again, _, _ = _run(half, INSTANTID, zero)
    finally:
        hook.remove()
    assert seen == [(F32, F32)] and pixels(again) == pixels(plain)
    # SDXL LoRAs in fp16 (Kohya at scale 1, then a PEFT file by URL) act, and leave nothing behind
    styled, _, _ = _run(half, INSTANTID, {**body, "selectedLoraModel": "80"})
    assert _dtypes(pipe.unet) == {F16} and any("lora_A" in n for n, _ in pipe.unet.named_parameters())
    url = _run(half, INSTANTID, {**body, "selectedLoraModelPrivateUrl": f"{base_url}/sdxl-lora-peft.safetensors"})[0]
    assert len({*pixels(plain), *pixels(styled), *pixels(url)}) == 3
    assert pixels(_run(half, INSTANTID, zero)[0]) == pixels(plain)
