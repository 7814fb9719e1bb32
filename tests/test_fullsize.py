"""Random-weight models at published sizes (``easel.synthetic.fullsize``) and the ``random`` model
source: parameter counts against the published ones (built on the meta device, no memory), the
small variants through the real tools in a worker, and ``gpu`` tests for dtype, device,
determinism and adapter state on CUDA (skipped without a CUDA device)."""
from __future__ import annotations

import json

import pytest
import torch

from easel.config import Settings
from easel.synthetic.fullsize import build_random, make_random, parameter_counts
from easel.storage import output_key
from easel.store import Store
from easel.tasks import lifecycle as lc
from easel.tasks.runner import Worker

from conftest import pixels

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)")

# Millions of parameters of the published networks (rounded to 0.1 M), from their model cards /
# config.json: SD 1.5 UNet 859.5 M, SDXL UNet 2567.5 M, FLUX.1-dev transformer 11901.4 M,
# CLIP ViT-L/14 text 123.1 M, OpenCLIP bigG text 694.7 M, T5-v1.1-XXL encoder 4762.3 M.
PUBLISHED = {
    "sd15": {"unet": 859.5, "text_encoder": 123.1, "vae": 83.7},
    "sdxl": {"unet": 2567.5, "text_encoder": 123.1, "text_encoder_2": 694.7, "vae": 83.7},
    "flux": {"transformer": 11901.4, "text_encoder": 123.1, "text_encoder_2": 4762.3, "vae": 83.8},
}


@pytest.mark.parametrize("family", sorted(PUBLISHED))
def test_full_size_networks_have_the_published_parameter_counts(family):
    pipe = build_random(family, "full", device="meta", dtype=torch.bfloat16)
    counts = {k: round(v / 1e6, 1) for k, v in parameter_counts(pipe).items()}
    assert counts == PUBLISHED[family]


def test_make_random_writes_a_folder_that_from_pretrained_loads(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    folder = make_random(tmp_path, "sdxl", "small")
    stamp = json.loads((folder / "easel-random.json").read_text())
    assert stamp["family"] == "sdxl" and stamp["parameters"]["unet"] > 1e6
    assert (folder / "lora-peft.safetensors").is_file()
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder))
    again = make_random(tmp_path, "sdxl", "small")  # idempotent: nothing rewritten
    assert again == folder and (folder / "easel-random.json").read_text() == json.dumps(stamp)
    out = pipe("a lighthouse", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(3)).images
    assert out.shape == (1, 64, 64, 3)


@pytest.fixture(scope="module")
def random_worker(tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("random"), model_source="random",
                        random_model_size="small")
    Store(settings.core.database_url).migrate()
    return Worker(settings)


def _run(worker: Worker, tool: str, inputs: dict) -> dict:
    from easel.catalog import ModelCatalog, load_tools

    spec = load_tools()[tool]
    valid = spec.validate(inputs, ModelCatalog.load(None))
    task, _ = lc.submit(worker.store, project_id=1, tool=tool, parameters=inputs, inputs=valid, callbackurl="",
                        cost_per_second=0.0)
    assert worker.run_next() == task.id
    done = worker.store.get_task(task.id)
    assert done.pexit == "0", done.debugerror
    return {"task": done, "images": [worker.storage.get_bytes(output_key(o.path)) for o in worker.store.outputs(task.id)]}


SD = ("wiro/text-to-image-sd-lora", {"prompt": "a red fish", "samples": 1, "steps": 2, "width": 64, "height": 64,
                                     "seed": "5", "selectedLoraModel": []})
FLUX = ("wiro/text-to-image-flux-lora-fast", {"prompt": "a lion", "samples": 1, "steps": 2, "width": 64,
                                              "height": 64, "seed": "5"})


@pytest.mark.parametrize("tool,inputs", [SD, FLUX], ids=["sd15", "flux"])
def test_random_source_runs_the_tools_deterministically_without_lora_leaks(random_worker, tool, inputs):
    """On the device the worker picks (CUDA when present): same seed → same pixels; a task with a
    LoRA changes the output and leaves nothing behind for the next task without one."""
    plain = pixels(_run(random_worker, tool, inputs)["images"])
    assert pixels(_run(random_worker, tool, inputs)["images"]) == plain
    lora = {"selectedLoraModel": [61]} if tool == SD[0] else {"selectedLoraModel": "655"}
    without = {} if tool == SD[0] else {"selectedLoraModel": "", "flux-RealismLora": 0}
    with_lora = pixels(_run(random_worker, tool, {**inputs, **lora})["images"])
    assert with_lora != pixels(_run(random_worker, tool, {**inputs, **without})["images"])
    assert pixels(_run(random_worker, tool, inputs)["images"]) == plain


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("family,attr,dtype", [("sd15", "unet", torch.float16), ("sdxl", "unet", torch.float16),
                                               ("flux", "transformer", torch.bfloat16)])
def test_gpu_random_pipelines_use_the_catalog_dtype_on_cuda_and_are_deterministic(family, attr, dtype):
    pipe = build_random(family, "small", device="cuda")
    net = getattr(pipe, attr)
    assert net.dtype == dtype and net.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in pipe.text_encoder.parameters())

    def go():
        return pipe("a cat", num_inference_steps=2, height=128, width=128, output_type="pt",
                    generator=torch.Generator("cuda").manual_seed(11)).images

    first, second = go(), go()
    assert first.device.type == "cuda" and torch.equal(first, second)


@gpu
@pytest.mark.gpu
def test_gpu_tools_load_their_pipelines_in_the_catalog_dtype(random_worker):
    from easel.tools import flux_lora, sd_lora

    sd = sd_lora.load_pipeline(random_worker.models.sources.checkpoint(random_worker.catalog.get(1)))
    assert sd.unet.dtype == torch.float16 and sd.unet.device.type == "cuda"
    flux_entry = next(e for e in random_worker.catalog.entries.values() if e.kind == "flux")
    flux = flux_lora.load_pipeline(random_worker.models.sources.checkpoint(flux_entry), random_worker.settings)
    assert flux.transformer.dtype == torch.bfloat16


def test_the_device_memory_probe_answers_only_with_cuda():
    from easel.weights.cache import device_free_bytes

    if not CUDA:
        assert device_free_bytes() is None
        return
    before = device_free_bytes()
    block = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 256 MiB, held
    assert 0 < device_free_bytes() <= before - 200 * 2**20
    del block  # back to the allocator's reserve: free again for this process
    assert device_free_bytes() >= before - 16 * 2**20


def test_gpus_are_dealt_round_robin_to_worker_slots():
    from easel.executors.local import gpu_for_slot

    assert [gpu_for_slot(i, ("0", "1")) for i in range(4)] == ["0", "1", "0", "1"]
    assert gpu_for_slot(3, ()) is None


def test_gpus_setting_reads_a_comma_list_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EASEL_GPUS", "2, 3")
    assert Settings.from_env(data_dir=tmp_path).worker.gpus == ("2", "3")
    monkeypatch.setenv("EASEL_GPUS", "all")
    from easel.executors.local import expand_gpus

    assert Settings.from_env(data_dir=tmp_path).worker.gpus == ("all",)  # expanded where the workers start
    assert expand_gpus(("all",)) == tuple(str(i) for i in range(torch.cuda.device_count()))
    assert expand_gpus(("1",)) == ("1",)
