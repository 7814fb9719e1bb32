"""Unit tests: catalog data and validation, tiny formats, clip skip, the pipeline cache, the fetcher, the store."""
from __future__ import annotations

import os
import struct
from pathlib import Path
import time

import numpy as np

import pytest

import services
from easel.catalog import CatalogError, InputError, ModelCatalog, load_tools
from easel.config import Settings
from easel.net.fetch import FetchError, FetchPolicy, check_safetensors, fetch_safetensors, vet_url

SEED_TOOLS = {"wiro/text-to-image-sd-lora", "wiro/text-to-image-flux-lora-fast", "Adel_AI/Comics-Factory-v1",
              "wiro/instant-id-controlnet-lora", "wiro/ic-light-background"}


# -- catalog ---------------------------------------------------------------------------------

def test_all_seed_tools_are_described_with_global_option_ids():
    tools, catalog = load_tools(), ModelCatalog.load()
    assert set(tools) == SEED_TOOLS
    for spec in tools.values():
        for i in spec.inputs:
            for o in i.options:
                if "model" in o:
                    assert o["model"] in catalog.entries, (spec.name, i.name, o)
            if i.type in ("select", "multiselect") and i.default and any("model" in o for o in i.options):
                for d in str(i.default).split(","):
                    assert d in catalog.entries, (spec.name, i.name, d)  # 1, 79, 80, 655 included
    assert catalog.get("1").label == "CompVis/stable-diffusion-v1-4" and catalog.get("1").kind == "sd15"
    for mid in ("79", "80", "655"):
        assert catalog.get(mid).why and catalog.get(mid).source
    assert catalog.get("61").generatesettings[0]["defaultvalue"] == "0.3"
    sd = tools["wiro/text-to-image-sd-lora"]
    assert (sd.input("samples").default, sd.input("steps").default, sd.input("scale").default) == (4, 30, 7.5)
    assert sd.input("scheduler").default == "EulerDiscreteScheduler"


def test_validation_quirks():
    spec, catalog = load_tools()["wiro/text-to-image-sd-lora"], ModelCatalog.load()
    v = spec.validate({}, catalog)
    assert v["selectedModel"] == "1" and v["selectedLoraModel"] == ["61"] and v["Fish-out-of-Water-v1.0"] == 0.3
    v = spec.validate({"selectedModel": "", "selectedLoraModel": [], "scale": "7.5", "samples": "4.0",
                       "unknownField": "ignored"}, catalog)
    assert v["selectedModel"] == "1" and v["selectedLoraModel"] == [] and v["scale"] == 7.5 and v["samples"] == 4
    assert "unknownField" not in v
    v = spec.validate({"selectedLoraModel": "62, 68", "Skin-Tone-Slider-v1.0": "-5"}, catalog)
    assert v["selectedLoraModel"] == ["62", "68"] and v["Skin-Tone-Slider-v1.0"] == -5.0
    assert v["Emotion-Happy-Slider-v1.0"] == 5.0
    with pytest.raises(InputError) as e:
        spec.validate({"selectedModelPrivate": "7"}, catalog)
    assert e.value.field == "selectedModelPrivate"


def test_unknown_source_error_tells_the_operator_what_to_do(tmp_path):
    catalog = ModelCatalog.load(tmp_path / "override.json")
    with pytest.raises(CatalogError) as e:
        catalog.require_source(catalog.get("1087"))
    assert "override.json" in str(e.value) and '"1087"' in str(e.value) and "easel models set 1087" in str(e.value)
    (tmp_path / "override.json").write_text('{"models": {"1087": {"source": {"type": "hf", "repo": "me/doll"}}}}')
    assert ModelCatalog.load(tmp_path / "override.json").get("1087").source["repo"] == "me/doll"


# -- tiny models, clip skip, cache -----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pipe(tiny):
    from easel.weights.sources import Weights
    from easel.tools.sd_lora import load_pipeline

    return load_pipeline(Weights("diffusers", tiny["sd15"]))


def test_single_file_checkpoint_holds_the_same_weights(tiny, tiny_pipe):
    import torch
    from safetensors import safe_open

    from easel.weights.sources import Weights
    from easel.tools.sd_lora import load_pipeline

    with safe_open(str(tiny["sd15-single-file"]), "pt") as fh:
        keys = list(fh.keys())
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    single = load_pipeline(Weights("single_file", tiny["sd15-single-file"], config=tiny["sd15"]))
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(tiny_pipe, name).state_dict(), getattr(single, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_tiny_unet_design_keeps_sd_scale_factor_and_one_head(tiny_pipe):
    assert tiny_pipe.vae_scale_factor == 8
    assert tiny_pipe.unet.config.attention_head_dim == 1  # legacy name: the number of heads


def test_clip_skip_matches_the_hidden_state_definition(tiny_pipe):
    import torch

    from easel.tools.sd_lora import encode_prompt

    ids = tiny_pipe.tokenizer(["a cat"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = tiny_pipe.text_encoder(ids, output_hidden_states=True)
        expected = tiny_pipe.text_encoder.final_layer_norm(out.hidden_states[-3])
    assert torch.allclose(encode_prompt(tiny_pipe, ["a cat"], 2), expected)
    assert torch.allclose(encode_prompt(tiny_pipe, ["a cat"], 0), out.last_hidden_state, atol=1e-6)
    assert not torch.allclose(encode_prompt(tiny_pipe, ["a cat"], 4), out.last_hidden_state)


def test_switching_loras_does_not_reload_the_base_model(tmp_path, tiny):
    from easel.weights import ModelManager
    from easel.weights.sources import Weights
    from easel.tools.sd_lora import load_pipeline

    manager = ModelManager(Settings(data_dir=tmp_path), ModelCatalog.load())
    loader = lambda: load_pipeline(Weights("diffusers", tiny["sd15"]))  # noqa: E731
    pipe = manager.pipeline("base", loader)
    a, b = ("a", str(tiny["sd15-lora-kohya"]), 1.0), ("b", str(tiny["sd15-lora-peft"]), 0.5)
    for loras in ([a], [b], [a, b], [], [a]):
        assert manager.pipeline("base", loader) is pipe
        manager.adapters(pipe).apply(pipe, loras)
    assert manager.pipelines.loads == {"base": 1}
    assert manager.adapters(pipe).loads == 2  # each file loaded once, then only switched


def test_lora_of_another_family_is_refused(tmp_path, tiny_pipe):
    import torch
    from safetensors.torch import save_file

    from easel.weights.cache import LoraState

    bogus = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 640),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(640, 4)}, str(bogus))
    with pytest.raises(ValueError) as e:
        LoraState().apply(tiny_pipe, [("bogus", str(bogus), 1.0)])
    assert "bogus" in str(e.value)


# -- fetcher ---------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["http://127.0.0.1/x.safetensors", "http://10.1.2.3/x", "http://169.254.169.254/latest",
                                 "http://[::1]/x", "http://192.168.0.1/x", "ftp://example.com/x", "file:///etc/passwd",
                                 "http://localhost:8000/x"])
def test_fetcher_refuses_non_public_targets(url):
    with pytest.raises(FetchError):
        vet_url(url, FetchPolicy())


def test_fetcher_allow_list_and_caps(file_server, tmp_path):
    from easel.storage import LocalStorage

    base, folder = file_server
    policy = FetchPolicy(allow=("127.0.0.1",))
    assert vet_url(f"{base}/x", policy)[3] == "127.0.0.1"
    storage = LocalStorage(Settings(data_dir=tmp_path / "d"))
    cache = tmp_path / "d" / "models" / "fetched"
    path = fetch_safetensors(f"{base}/sd15-lora-kohya.safetensors", storage, policy, cache)
    assert path.parent == cache and path.name == f"{__import__('hashlib').sha256(path.read_bytes()).hexdigest()}.safetensors"
    (folder / "sd15-lora-kohya.safetensors").rename(folder / "moved.safetensors")
    try:  # cached: the URL is not fetched again
        assert fetch_safetensors(f"{base}/sd15-lora-kohya.safetensors", storage, policy, cache) == path
    finally:
        (folder / "moved.safetensors").rename(folder / "sd15-lora-kohya.safetensors")
    with pytest.raises(FetchError, match="limit"):
        fetch_safetensors(f"{base}/sd15-lora-peft.safetensors", storage, FetchPolicy(allow=("127.0.0.1",), max_bytes=1000),
                          cache)
    with pytest.raises(FetchError, match="pickle"):
        fetch_safetensors(f"{base}/evil.safetensors", storage, policy, cache)
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_safetensors(f"{base}/missing.safetensors", storage, policy, cache)
    assert not list(cache.glob("*.part"))


def test_safetensors_header_checks(tmp_path):
    bad = tmp_path / "bad.safetensors"
    header = b'{"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}'
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 10)  # truncated body
    with pytest.raises(FetchError, match="inconsistent"):
        check_safetensors(bad)


# -- store on PostgreSQL ---------------------------------------------------------------------

def test_schema_migrates_and_claims_on_postgresql():
    psycopg = services.import_or_missing("psycopg", "PostgreSQL")
    try:
        admin = psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True, connect_timeout=3)
    except Exception as exc:
        services.missing("PostgreSQL", f"not reachable on 127.0.0.1: {exc}")
    name = f"easel_test_{os.getpid()}"
    admin.execute(f"DROP DATABASE IF EXISTS {name}")
    admin.execute(f"CREATE DATABASE {name}")
    try:
        from easel.store import Store
        from easel.tasks import lifecycle as lc

        store = Store(f"postgresql+psycopg://postgres@127.0.0.1/{name}")
        store.migrate()
        p = store.create_project("pg")
        t, created = lc.submit(store, project_id=p.id, tool="x/y", parameters={}, inputs={},
                               callbackurl="http://hooks.example/x", cost_per_second=0, idempotency_key="k1")
        again, created_again = lc.submit(store, project_id=p.id, tool="x/y", parameters={}, inputs={},
                                         callbackurl="", cost_per_second=0, idempotency_key="k1")
        assert created and not created_again and again.id == t.id
        assert lc.claim(store, "w1") == t.id and lc.claim(store, "w2") is None
        assert store.use_nonce(p.id, "1", 60) and not store.use_nonce(p.id, "1", 60)
        lc.advance(store, t.id, lc.POSTPROCESS_END, pexit="0")  # terminal: a webhook delivery is queued with it
        leased = store.lease_due_deliveries(time.time() + 1, lease_seconds=30)
        assert [d.task_id for d in leased] == [t.id] and store.lease_due_deliveries(time.time() + 1, 30) == []
        store.engine.dispose()
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def test_hub_source_fails_clearly_when_offline(tmp_path, monkeypatch):
    from easel.weights.sources import ModelSources

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sources = ModelSources(Settings(data_dir=tmp_path, model_source="hub"), ModelCatalog.load())
    with pytest.raises(CatalogError) as e:
        sources.checkpoint(ModelCatalog.load().get("1"))
    assert "CompVis/stable-diffusion-v1-4" in str(e.value) and "--model-source tiny" in str(e.value)
    with pytest.raises(CatalogError, match="no weights source configured") as e:
        sources.lora(ModelCatalog.load().get("61"))
    assert "easel models set 61 --hf" in str(e.value)


# -- FLUX: LoRA layouts and the hot-swap slot ----------------------------------------------------


def test_lora_layouts_are_recognised(tiny):
    from easel.weights.lora_formats import LoraFormatError, read_lora_layout, require_family

    expected = {"flux-lora-peft": ("flux", "peft"), "flux-lora-kohya": ("flux", "kohya"),
                "flux-lora-xlabs": ("flux", "xlabs"), "flux-lora-bfl": ("flux", "bfl"), "sd15-lora-peft": ("sd", "peft"),
                "sd15-lora-kohya": ("sd", "kohya")}
    for name, (family, layout) in expected.items():
        found = read_lora_layout(tiny[name])
        assert (found.family, found.layout) == (family, layout), name
    with pytest.raises(LoraFormatError, match="made for a Stable Diffusion UNet .*kohya layout.*needs a LoRA for a FLUX.1"):
        require_family(tiny["sd15-lora-kohya"], "flux", "selectedLoraModelPrivateUrl")
    with pytest.raises(LoraFormatError, match="made for a FLUX.1 transformer"):
        require_family(tiny["flux-lora-xlabs"], "sd", "selectedLoraModelPrivateUrl")


def test_bfl_layout_loads_as_its_kohya_rename(tiny):
    import torch
    from safetensors.torch import load_file

    from easel.weights.lora_formats import bfl_to_kohya, loadable

    renamed = loadable(tiny["flux-lora-bfl"])
    assert isinstance(renamed, dict) and "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in renamed
    again = bfl_to_kohya(load_file(str(tiny["flux-lora-bfl"])))
    assert renamed.keys() == again.keys() and all(torch.equal(renamed[k], again[k]) for k in renamed)
    assert loadable(tiny["flux-lora-kohya"]) == str(tiny["flux-lora-kohya"])  # other layouts go to diffusers as files
    pipe = _flux_pipe(tiny)
    plain = _flux_image(pipe)
    pipe.load_lora_weights(renamed, adapter_name="bfl")
    assert pipe.get_list_adapters()["transformer"] == ["bfl"] and (_flux_image(pipe) != plain).any()


def test_bfl_layout_is_recognised():
    from easel.weights.lora_formats import LoraFormatError, detect_lora_layout

    keys = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight",
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight"}
    assert detect_lora_layout(keys).layout == "bfl"
    with pytest.raises(LoraFormatError, match="unknown LoRA key layout"):
        detect_lora_layout({"foo.weight"})


def _flux_image(pipe):
    import torch

    out = pipe("a lion", num_inference_steps=2, width=64, height=64, generator=torch.Generator().manual_seed(3))
    return np.asarray(out.images[0])


def _flux_pipe(tiny):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(tiny["flux"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _assert_same_image_up_to_rounding(got, expected):
    """The hot-swap slot computes ``(0.7·B)·A·x`` with B zero-padded to the slot's rank, a fresh
    adapter ``0.7·(B·A·x)`` at its own rank: the same value in exact arithmetic, but float32
    rounding (and, with several torch threads, the BLAS blocking of the rank dimension) may differ
    in the last bits, which can move a pixel by one 8-bit level. Anything beyond that is a defect:
    a wrong scale or a stale LoRA changes most pixels by far more."""
    diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= 1, f"pixels differ by up to {diff.max()} levels"
    assert (diff > 0).mean() < 0.01, f"{(diff > 0).mean():.1%} of pixel values differ"


def test_hotswap_slot_gives_the_same_pixels_as_a_fresh_load(tiny):
    from easel.weights.cache import LoraState

    fresh = {}
    for layout in ("kohya", "xlabs"):
        pipe = _flux_pipe(tiny)
        pipe.load_lora_weights(str(tiny[f"flux-lora-{layout}"]), adapter_name="x")
        pipe.set_adapters(["x"], [0.7])
        fresh[layout] = _flux_image(pipe)
    pipe = _flux_pipe(tiny)
    state = LoraState(hotswap_rank=16)
    state.apply(pipe, [("peft", str(tiny["flux-lora-peft"]), 1.0)])  # targets every attention projection + proj_out
    for layout in ("kohya", "xlabs"):
        state.apply(pipe, [(layout, str(tiny[f"flux-lora-{layout}"]), 0.7)])
        assert "hot-swapped" in state.last_action
        _assert_same_image_up_to_rounding(_flux_image(pipe), fresh[layout])
    assert (state.loads, state.hotswaps) == (1, 2)
    plain = _flux_image(_flux_pipe(tiny))
    state.apply(pipe, [])
    np.testing.assert_array_equal(_flux_image(pipe), plain)


def test_non_hotswappable_lora_reloads_the_slot_not_the_base(tiny, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from easel.weights.cache import LoraState

    # the PEFT LoRA plus text-encoder weights: the slot (made by a transformer-only LoRA) has no
    # text-encoder layers, so it cannot be hot-swapped (block layers always can: the slot covers them)
    sd = load_file(str(tiny["flux-lora-peft"]))
    te = _flux_pipe(tiny).text_encoder
    g = torch.Generator().manual_seed(0)
    for name, module in te.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            sd[f"text_encoder.{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=g)
            sd[f"text_encoder.{name}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=g)
    path = tmp_path / "peft-te.safetensors"
    save_file(sd, str(path))
    pipe = _flux_pipe(tiny)
    transformer = pipe.transformer
    state = LoraState(hotswap_rank=16)
    state.apply(pipe, [("xlabs", str(tiny["flux-lora-xlabs"]), 1.0)])  # transformer only
    state.apply(pipe, [("peft-te", str(path), 1.0)])  # text encoder too: cannot hot-swap
    assert "adapter slot reloaded" in state.last_action
    assert pipe.transformer is transformer and state.loads == 2
    ref = _flux_pipe(tiny)
    ref.load_lora_weights(str(path), adapter_name="x")
    assert "text_encoder" in ref.get_list_adapters()
    _assert_same_image_up_to_rounding(_flux_image(pipe), _flux_image(ref))


def test_every_setting_is_documented():
    from easel.config import field_names

    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    missing = [name for name in field_names() if f"EASEL_{name.upper()}" not in doc]
    assert len(field_names()) > 70 and missing == []


def test_settings_from_env_parse_types(monkeypatch, tmp_path):
    monkeypatch.setenv("EASEL_TORCH_COMPILE", "true")
    monkeypatch.setenv("EASEL_MAX_CONCURRENT_TASKS", "3")
    monkeypatch.setenv("EASEL_LIVE_POLL_INTERVAL", "0.5")
    monkeypatch.setenv("EASEL_FETCH_ALLOW", "127.0.0.1, 10.0.0.0/8")
    s = Settings.from_env(data_dir=tmp_path)
    assert (s.weights.torch_compile, s.api.max_concurrent_tasks, s.live.live_poll_interval) == (True, 3, 0.5)
    assert s.fetch.fetch_allow == ("127.0.0.1", "10.0.0.0/8")


def test_flux_offload_decision(tmp_path):
    from easel.tools.flux_lora import needs_offload, weights_bytes

    flux_dev = 33 * 1024**3
    assert needs_offload(flux_dev, 24 * 1024**3, forced=False)  # RTX 4090 / L4-class card
    assert not needs_offload(flux_dev, 80 * 1024**3, forced=False)  # A100/H100 80 GB
    assert needs_offload(1, 80 * 1024**3, forced=True)
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 300)
    (tmp_path / "text_encoder_2").mkdir()
    (tmp_path / "text_encoder_2" / "model-00001-of-00002.safetensors").write_bytes(b"x" * 50)
    (tmp_path / "transformer" / "config.json").write_text("{}")
    assert weights_bytes(tmp_path) == 350


def test_compiled_transformer_is_not_recompiled_by_lora_changes(tiny):
    """The "fast" claim: with the transformer compiled, changing LoRA, scale, or LoRA on/off
    recompiles nothing (dynamo raises on any recompilation)."""
    import torch

    from easel.weights.cache import LoraState

    pipe = _flux_pipe(tiny)
    state = LoraState(hotswap_rank=16)
    state.apply(pipe, [("peft", str(tiny["flux-lora-peft"]), 1.0)])
    pipe.transformer.compile()
    first = _flux_image(pipe)
    torch._dynamo.config.error_on_recompile = True
    try:
        seen = []
        for key, scale in (("kohya", 0.8), ("xlabs", 1.0), ("bfl", 0.5), ("xlabs", 0.0)):
            state.apply(pipe, [(key, str(tiny[f"flux-lora-{key}"]), scale)])
            seen.append(_flux_image(pipe))
        state.apply(pipe, [])
        seen.append(_flux_image(pipe))
        state.apply(pipe, [("peft", str(tiny["flux-lora-peft"]), 1.0)])
        np.testing.assert_array_equal(_flux_image(pipe), first)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert state.hotswaps == 5 and state.loads == 1
    np.testing.assert_array_equal(seen[3], seen[4])  # scale 0 and no LoRA are the same image
    assert not np.array_equal(seen[0], seen[1])
