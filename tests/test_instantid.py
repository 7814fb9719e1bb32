"""InstantID foundations on the tiny models: tiny SDXL (folder and single file), SDXL ControlNets and
LoRAs, the tiny antelopev2 ONNX pack through insightface's own loading code, the IP-Adapter
(resampler + attention processors + adapter files), keypoint drawing, condition images and the
whole InstantID pipeline (IdentityNet + user ControlNets as one multi-ControlNet)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from easel.synthetic.tiny_faces import draw_test_face

STEPS, SIZE = 2, 64


def _photo(variant: int = 0, box=(44, 34, 84, 82), size=(128, 128)) -> Image.Image:
    image = Image.new("RGB", size, (128, 128, 128))
    draw_test_face(image, box, variant)
    return image


# -- tiny SDXL -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdxl(tiny):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny["sdxl"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sdxl_image(pipe):
    return pipe(prompt="a cat", num_inference_steps=STEPS, width=SIZE, height=SIZE, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def test_tiny_sdxl_single_file_equals_the_folder(tiny, sdxl):
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    with safe_open(str(tiny["sdxl-single-file"]), "pt") as fh:
        keys = set(fh.keys())
    assert "model.diffusion_model.label_emb.0.0.weight" in keys  # SDXL's added-conditions MLP, SGM name
    assert "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys  # OpenCLIP-G naming
    assert sdxl.unet.config.addition_embed_type == "text_time"
    assert type(sdxl.text_encoder_2).__name__ == "CLIPTextModelWithProjection" and sdxl.vae_scale_factor == 8
    single = StableDiffusionXLPipeline.from_single_file(str(tiny["sdxl-single-file"]), config=str(tiny["sdxl"]))
    single.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(sdxl, name).state_dict(), getattr(single, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    image = _sdxl_image(sdxl)
    assert image.shape == (SIZE, SIZE, 3) and image.std() > 0.01
    assert np.array_equal(image, _sdxl_image(single))


def _unet_out(pipe, ehs=None):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ehs = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g) if ehs is None else ehs
    cond = {"text_embeds": torch.randn(1, 64, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return pipe.unet(x, 500, encoder_hidden_states=ehs, added_cond_kwargs=cond).sample


def test_tiny_sdxl_loras_in_kohya_and_peft_layouts_load_and_act(tiny):
    from diffusers import StableDiffusionXLPipeline

    from easel.weights.lora_formats import read_lora_layout

    assert read_lora_layout(tiny["sdxl-lora-kohya"]).layout == "kohya-ldm"  # sd-scripts' SDXL naming
    assert read_lora_layout(tiny["sdxl-lora-peft"]).layout == "peft"
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny["sdxl"]))
    plain = _unet_out(pipe)
    outs = []
    for name in ("sdxl-lora-kohya", "sdxl-lora-peft"):
        pipe.load_lora_weights(str(tiny[name]), adapter_name=name.replace("-", "_"))
        pipe.set_adapters([name.replace("-", "_")], [1.0])
        outs.append(_unet_out(pipe))
        assert not torch.allclose(outs[-1], plain), name
    assert not torch.allclose(outs[0], outs[1])


def test_tiny_controlnets_are_sdxl_controlnets_that_condition(tiny, sdxl):
    from easel.pipelines.instantid import load_controlnet
    from easel.synthetic.tiny_sdxl import CONTROLNETS

    # thibaud/controlnet-openpose-sdxl-1.0's layout: config.json + OpenPoseXL2.safetensors (diffusers keys)
    assert sorted(p.name for p in tiny["sdxl-controlnet-openpose"].iterdir()) == ["OpenPoseXL2.safetensors", "config.json"]
    residuals = []
    for name in CONTROLNETS:
        net = load_controlnet(tiny[f"sdxl-controlnet-{name}"])
        assert net.config.addition_embed_type == "text_time"
        assert net.config.cross_attention_dim == sdxl.unet.config.cross_attention_dim
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            down, mid = net(torch.randn(1, 4, 8, 8, generator=g), 500, encoder_hidden_states=torch.randn(1, 16, 96, generator=g),
                            controlnet_cond=torch.rand(1, 3, 64, 64, generator=g), return_dict=False,
                            added_cond_kwargs={"text_embeds": torch.randn(1, 64, generator=g),
                                               "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])})
        assert mid.abs().max() > 0
        residuals.append(mid)
    assert not torch.allclose(residuals[0], residuals[1])  # each has its own weights


# -- tiny face pack through insightface ---------------------------------------------------------

@pytest.fixture(scope="module")
def analyzer(tiny):
    from easel.pipelines.faces import FaceAnalyzer

    return FaceAnalyzer(tiny["faces"], providers=["CPUExecutionProvider"])


def test_tiny_face_pack_has_antelopev2_names_and_shapes(tiny):
    import onnx

    folder = Path(tiny["faces"]) / "models" / "antelopev2"
    det = onnx.load(str(folder / "scrfd_10g_bnkps.onnx")).graph
    assert [i.name for i in det.input] == ["input.1"]
    assert [d.dim_value or d.dim_param for d in det.input[0].type.tensor_type.shape.dim] == [1, 3, "?", "?"]
    assert [o.name for o in det.output] == ["448", "471", "494", "451", "474", "497", "454", "477", "500"]
    assert [d.dim_value for d in det.output[0].type.tensor_type.shape.dim] == [12800, 1]
    assert [d.dim_value for d in det.output[8].type.tensor_type.shape.dim] == [800, 10]
    rec = onnx.load(str(folder / "glintr100.onnx")).graph
    assert [i.name for i in rec.input] == ["input.1"] and [o.name for o in rec.output] == ["1333"]
    assert [d.dim_value or d.dim_param for d in rec.input[0].type.tensor_type.shape.dim] == ["None", 3, 112, 112]


def test_insightface_loads_the_tiny_pack_and_finds_the_drawn_face(analyzer):
    assert type(analyzer._app.models["detection"]).__name__ == "SCRFD"
    assert type(analyzer._app.models["recognition"]).__name__ == "ArcFaceONNX"
    face = analyzer.largest_face(_photo(0))
    assert np.allclose(face.bbox, [44, 34, 84, 82], atol=1.5), face.bbox
    assert face.kps.shape == (5, 2) and face.embedding.shape == (512,) and face.embedding.dtype == np.float32
    x0, y0, x1, y1 = face.bbox
    assert all(x0 < x < x1 and y0 < y < y1 for x, y in face.kps)
    assert face.kps[0, 0] < face.kps[1, 0] and face.kps[2, 1] < face.kps[3, 1]  # eyes left→right, nose above mouth
    again = analyzer.largest_face(_photo(0))
    assert np.array_equal(again.embedding, face.embedding)  # deterministic
    other = analyzer.largest_face(_photo(1))
    assert np.allclose(other.bbox, face.bbox, atol=1.5) and not np.allclose(other.embedding, face.embedding)


def test_the_largest_face_is_used_and_no_face_is_a_clear_error(analyzer):
    from easel.pipelines.faces import NoFaceError

    image = Image.new("RGB", (400, 300), (128, 128, 128))
    draw_test_face(image, (10, 10, 70, 70), 0)
    draw_test_face(image, (200, 120, 330, 250), 1)
    faces = analyzer.faces(image)
    assert len(faces) == 2
    assert np.allclose(analyzer.largest_face(image).bbox, [200, 120, 330, 250], atol=2)
    with pytest.raises(NoFaceError, match="no face detected in inputImageUrl"):
        analyzer.largest_face(Image.new("RGB", (128, 128), (200, 180, 160)))


def test_missing_face_pack_says_where_and_why(tmp_path):
    from easel.pipelines.faces import FaceAnalyzer, FacePackMissing

    with pytest.raises(FacePackMissing) as e:
        FaceAnalyzer(tmp_path)
    message = str(e.value)
    assert str(tmp_path / "models" / "antelopev2") in message
    assert "scrfd_10g_bnkps.onnx" in message and "glintr100.onnx" in message and "non-commercial" in message


# -- keypoints, conditions ----------------------------------------------------------------------

def _reference_draw_kps(size, kps):
    """An independent transcription of the reference ``draw_kps`` (InstantID's pipeline file)."""
    import cv2

    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
    limbs = np.array([[0, 2], [1, 2], [3, 2], [4, 2]])
    kps = np.array(kps)
    w, h = size
    out = np.zeros([h, w, 3])
    for index in limbs:
        color = colors[index[0]]
        x, y = kps[index][:, 0], kps[index][:, 1]
        length = ((x[0] - x[1]) ** 2 + (y[0] - y[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(x)), int(np.mean(y))), (int(length / 2), 4), int(angle), 0, 360, 1)
        out = cv2.fillConvexPoly(out.copy(), polygon, color)
    out = (out * 0.6).astype(np.uint8)
    for i, (x, y) in enumerate(kps):
        out = cv2.circle(out.copy(), (int(x), int(y)), 10, colors[i], -1)
    return out


def test_draw_kps_matches_the_reference_drawing():
    from easel.pipelines.instantid import draw_kps

    kps = [[70.4, 80.2], [130.7, 78.9], [101.1, 115.6], [78.3, 150.2], [125.9, 149.0]]
    drawn = np.asarray(draw_kps((220, 200), kps))
    assert drawn.shape == (200, 220, 3)
    assert np.array_equal(drawn, _reference_draw_kps((220, 200), kps))
    assert tuple(drawn[80, 70]) == (255, 0, 0) and tuple(drawn[149, 125]) == (255, 0, 255)  # discs
    assert tuple(drawn[133, 89]) == (153, 153, 0)  # mouth-left → nose limb at 0.6 × yellow
    assert tuple(drawn[5, 5]) == (0, 0, 0)
    with pytest.raises(ValueError, match="five"):
        draw_kps((64, 64), kps[:4])


def test_condition_images(tiny):
    from easel.pipelines.conditions import DepthEstimator, canny_condition

    photo = _photo(0)
    edges = canny_condition(photo)
    assert edges.mode == "L" and edges.size == photo.size
    arr = np.asarray(edges)
    assert set(np.unique(arr)) == {0, 255} and arr[58, 43] == 255 and arr[33, 60] == 255 and arr[5, 5] == 0  # the patch border
    depth = DepthEstimator(tiny["depth-dpt"])(photo, size=(64, 48))
    assert depth.size == (64, 48) and depth.mode == "RGB"
    d = np.asarray(depth)
    assert d.min() == 0 and d.max() == 255  # min-max normalised as the reference


# -- IP-Adapter files ---------------------------------------------------------------------------

def test_adapter_files_pickle_and_safetensors_agree_and_hostile_pickles_are_refused(tiny, tmp_path):
    import pickle

    from easel.pipelines.instantid import AdapterFormatError, load_adapter_file

    a_proj, a_ip = load_adapter_file(tiny["instantid-ip-adapter"])
    b_proj, b_ip = load_adapter_file(tiny["instantid-ip-adapter-safetensors"])
    assert a_proj.keys() == b_proj.keys() and all(torch.equal(a_proj[k], b_proj[k]) for k in a_proj)
    assert a_ip.keys() == b_ip.keys() and "1.to_k_ip.weight" in a_ip and "0.to_k_ip.weight" not in a_ip
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "ip-adapter.bin"
    evil.write_bytes(pickle.dumps({"image_proj": Evil(), "ip_adapter": {}}))
    with pytest.raises(AdapterFormatError, match="not a readable IP-Adapter"):
        load_adapter_file(evil)
    assert not marker.exists()
    torch.save({"something": {"else": torch.zeros(1)}}, str(tmp_path / "other.bin"))
    with pytest.raises(AdapterFormatError, match="expected 'image_proj' and 'ip_adapter'"):
        load_adapter_file(tmp_path / "other.bin")


def test_adapter_for_another_unet_is_refused(tiny, sdxl):
    from easel.pipelines.instantid import AdapterFormatError, InstantIDAdapter, install_ip_adapter

    adapter = InstantIDAdapter.load(tiny["instantid-ip-adapter"])
    assert adapter.num_tokens == 16 and adapter.image_proj.proj_in.in_features == 512
    bad = {k: v[:, :8] for k, v in adapter.ip_state.items()}
    with pytest.raises(AdapterFormatError, match="needs"):
        install_ip_adapter(sdxl.unet.__class__.from_config(sdxl.unet.config), bad)


def test_ip_adapter_attention_adds_to_text_attention_and_can_be_removed(tiny):
    from diffusers import StableDiffusionXLPipeline

    from easel.pipelines.instantid import InstantIDAdapter, has_ip_adapter, remove_ip_adapter, set_ip_adapter_scale

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny["sdxl"]))
    text = torch.randn(1, 77, 96, generator=torch.Generator().manual_seed(5))
    plain = _unet_out(pipe, text)
    adapter = InstantIDAdapter.load(tiny["instantid-ip-adapter-safetensors"])
    adapter.attach(pipe.unet)
    cond, uncond = adapter.face_tokens(np.ones(512, np.float32))
    assert cond.shape == (1, 16, 96) and not torch.allclose(cond, uncond)
    with_face = torch.cat([text, cond], dim=1)
    set_ip_adapter_scale(pipe.unet, 0.0)
    assert torch.allclose(_unet_out(pipe, with_face), plain, atol=1e-5)  # scale 0: text attention only
    set_ip_adapter_scale(pipe.unet, 1.0)
    assert not torch.allclose(_unet_out(pipe, with_face), plain, atol=1e-3)
    remove_ip_adapter(pipe.unet)
    assert not has_ip_adapter(pipe.unet) and torch.allclose(_unet_out(pipe, text), plain, atol=1e-5)


# -- the InstantID pipeline ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def instantid(tiny):
    from diffusers import StableDiffusionXLPipeline

    from easel.pipelines.instantid import InstantIDAdapter, load_controlnet

    base = StableDiffusionXLPipeline.from_pretrained(str(tiny["sdxl"]))
    adapter = InstantIDAdapter.load(tiny["instantid-ip-adapter"])
    adapter.attach(base.unet)
    nets = {name: load_controlnet(tiny[f"sdxl-controlnet-{name}"])
            for name in ("identitynet", "openpose", "depth", "canny")}
    return base, adapter, nets


def _run(instantid, embedding, ip_scale, nets=("identitynet",), scales=(0.8,), images=None, seed=0, steps=STEPS,
         face_mask=None, prompt="a portrait"):
    from easel.pipelines.instantid import build_pipeline, draw_kps, generate

    base, adapter, all_nets = instantid
    pipe = build_pipeline(base, all_nets[nets[0]], [all_nets[n] for n in nets[1:]])
    kps = draw_kps((SIZE, SIZE), [[22, 26], [42, 26], [32, 36], [24, 46], [40, 46]])
    images = images or [kps] + [kps] * (len(nets) - 1)
    return generate(pipe, adapter, embedding, images, scales, ip_scale, prompt=prompt, negative_prompt="blurry",
                    num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator().manual_seed(seed),
                    output_type="np", face_mask=face_mask).images[0]


@pytest.fixture(scope="module")
def faces(analyzer):
    return analyzer.largest_face(_photo(0)), analyzer.largest_face(_photo(1))


def test_whole_pipeline_with_identitynet_and_three_controlnets(instantid, faces, tiny):
    from easel.pipelines.conditions import DepthEstimator, OpenposeEstimator, canny_condition
    from easel.pipelines.instantid import IPAttnProcessor, draw_kps

    base = instantid[0]
    procs = list(base.unet.attn_processors.values())
    assert sum(isinstance(p, IPAttnProcessor) for p in procs) == len(procs) // 2  # every cross-attention layer
    face = faces[0]
    photo = _photo(0).resize((SIZE, SIZE))
    kps_image = draw_kps((128, 128), face.kps).resize((SIZE, SIZE))
    pose = OpenposeEstimator(tiny["pose-openpose"])(photo)
    images = [kps_image, pose, DepthEstimator(tiny["depth-dpt"])(photo), canny_condition(photo)]
    out = _run(instantid, face.embedding, 0.8, ("identitynet", "openpose", "depth", "canny"), (0.8, 1.0, 1.0, 1.0), images)
    assert out.shape == (SIZE, SIZE, 3) and np.isfinite(out).all() and out.std() > 0.01
    only_id = _run(instantid, face.embedding, 0.8, images=images[:1])
    assert not np.array_equal(out, only_id)


def test_ip_adapter_scale_zero_removes_the_ip_path_exactly(instantid, faces):
    a, b = faces[0].embedding, faces[1].embedding
    # With IdentityNet at 0, the embedding reaches the model only through IP-Adapter attention:
    assert np.array_equal(_run(instantid, a, 0.0, scales=(0.0,)), _run(instantid, b, 0.0, scales=(0.0,)))
    assert not np.array_equal(_run(instantid, a, 0.8, scales=(0.0,)), _run(instantid, b, 0.8, scales=(0.0,)))
    # IdentityNet's cross-attention context is the face tokens too (as in the reference), so at
    # ip_adapter_scale 0 the identity still acts through IdentityNet:
    assert not np.array_equal(_run(instantid, a, 0.0), _run(instantid, b, 0.0))


def test_a_controlnet_at_scale_zero_equals_leaving_it_out(instantid, faces):
    emb = faces[0].embedding
    with_canny = _run(instantid, emb, 0.8, ("identitynet", "canny"), (0.8, 0.0))
    assert np.array_equal(with_canny, _run(instantid, emb, 0.8))
    assert not np.array_equal(_run(instantid, emb, 0.8, ("identitynet", "canny"), (0.8, 0.5)), with_canny)


def test_identitynet_reads_the_face_tokens_and_the_other_nets_the_text(instantid):
    """The demos' ``_full`` pipeline: net 0 (IdentityNet) attends to the face tokens, the user
    ControlNets to the text tokens, and a face mask scales IdentityNet's residuals only."""
    from easel.pipelines.instantid import MASK_SCALES, InstantIDMultiControlNet, mask_pyramid

    _, _, nets = instantid
    multi = InstantIDMultiControlNet([nets["identitynet"], nets["canny"]], num_tokens=4)
    g = torch.Generator().manual_seed(0)
    sample, cond = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    width = nets["canny"].config.cross_attention_dim
    text, face = torch.randn(2, 10, width, generator=g), torch.randn(2, 4, width, generator=g)
    pooled = nets["canny"].config.projection_class_embeddings_input_dim - 6 * nets["canny"].config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2, pooled, generator=g), "time_ids": torch.randn(2, 6, generator=g)}

    def net(name, context, scale):
        return nets[name](sample, 5, encoder_hidden_states=context, controlnet_cond=cond, conditioning_scale=scale,
                          added_cond_kwargs=added, return_dict=False)

    with torch.no_grad():
        mask = torch.zeros(64, 64)
        mask[8:40, 16:48] = 1.0
        for face_mask in (None, mask):
            multi.face_mask = face_mask
            down, mid = multi(sample, 5, torch.cat([text, face], dim=1), [cond, cond], [0.8, 0.5],
                              added_cond_kwargs=added)
            (d0, m0), (d1, m1) = net("identitynet", face, 0.8), net("canny", text, 0.5)
            if face_mask is not None:
                weights = mask_pyramid(face_mask)
                assert len(weights) == len(MASK_SCALES) == len(d0)
                d0, m0 = [r * w for r, w in zip(d0, weights)], m0 * weights[-1]
            for got, a, b in zip([*down, mid], [*d0, m0], [*d1, m1]):
                torch.testing.assert_close(got, a + b, rtol=0, atol=0)
        multi.face_mask = None


def test_face_region_masking(instantid, faces):
    """"Enhance non-face region": outside the mask neither IdentityNet nor the IP-Adapter acts.
    A mask of zeros is exactly both turned off; a mask of ones is exactly no mask."""
    from easel.pipelines.instantid import face_box_mask

    emb = faces[0].embedding
    off = _run(instantid, emb, 0.0, scales=(0.0,))
    assert np.array_equal(_run(instantid, emb, 0.8, face_mask=np.zeros((SIZE, SIZE), np.float32)), off)
    whole = _run(instantid, emb, 0.8)
    assert np.array_equal(_run(instantid, emb, 0.8, face_mask=np.ones((SIZE, SIZE), np.float32)), whole)
    box = face_box_mask((SIZE, SIZE), (10.7, 12.2, 40.9, 50.5))
    assert box.sum() == (50 - 12) * (40 - 10) and box[12, 10] == 1 and box[50, 40] == 0  # truncated, end exclusive
    masked = _run(instantid, emb, 0.8, face_mask=box)
    assert not np.array_equal(masked, whole) and not np.array_equal(masked, off)
    with pytest.raises(ValueError, match="face_mask"):
        _run(instantid, emb, 0.8, face_mask=np.ones((8, 8), np.float32))


def test_ip_adapter_attention_survives_loading_and_switching_loras(instantid, faces, tiny):
    from easel.weights.cache import LoraState
    from easel.pipelines.instantid import IPAttnProcessor, build_pipeline

    base, adapter, nets = instantid
    emb, other = faces[0].embedding, faces[1].embedding
    ip_only = dict(scales=(0.0,))  # IdentityNet off: the face acts through the IP-Adapter attention alone
    before = _run(instantid, emb, 0.8, **ip_only)
    ip_before = {n: p for n, p in base.unet.attn_processors.items() if isinstance(p, IPAttnProcessor)}
    pipe = build_pipeline(base, nets["identitynet"])
    state = LoraState()
    try:
        outs = {}
        for key in ("sdxl-lora-kohya", "sdxl-lora-peft", "sdxl-lora-kohya"):  # load, load another, switch back
            state.apply(pipe, [(key, str(tiny[key]), 1.0)])
            ip_now = {n: p for n, p in base.unet.attn_processors.items() if isinstance(p, IPAttnProcessor)}
            assert ip_now.keys() == ip_before.keys() and all(ip_now[n] is ip_before[n] for n in ip_now)
            if key not in outs:
                outs[key] = _run(instantid, emb, 0.8, **ip_only)
                assert not np.array_equal(outs[key], before), key  # the LoRA acts
        assert state.loads == 2 and not np.array_equal(outs["sdxl-lora-kohya"], outs["sdxl-lora-peft"])
        # with a LoRA active, another face still changes the image through the IP-Adapter attention
        assert not np.array_equal(_run(instantid, other, 0.8, **ip_only), outs["sdxl-lora-kohya"])
        state.apply(pipe, [])  # LoRA off: back to the adapter-only image (PEFT's disabled path differs by float rounding)
        assert np.allclose(_run(instantid, emb, 0.8, **ip_only), before, atol=1e-5)
    finally:
        state.apply(pipe, [])


# -- catalog and sources ------------------------------------------------------------------------

def test_catalog_components_resolve_to_their_tiny_stand_ins(tmp_path, tiny):
    from easel.catalog import CatalogError, ModelCatalog
    from easel.config import Settings
    from easel.weights.sources import ModelSources

    catalog = ModelCatalog.load()
    sources = ModelSources(Settings(data_dir=tmp_path, model_source="tiny"), catalog)
    sources._tiny = tiny  # already written by the session fixture
    assert sources.checkpoint(catalog.get("79")).path == tiny["sdxl"]
    assert sources.lora(catalog.get("80")).path == tiny["sdxl-lora-kohya"]  # pixel-art-xl ships in Kohya layout
    for mid, condition in (("454", "canny"), ("455", "depth"), ("458", "openpose")):
        entry = catalog.get(mid)
        assert entry.condition == condition and sources.component(entry).path == tiny[f"sdxl-controlnet-{condition}"]
    identitynet = sources.component(catalog.get("instantid-identitynet"))
    assert (identitynet.format, identitynet.path) == ("diffusers", tiny["sdxl-controlnet-identitynet"])
    adapter = sources.component(catalog.get("instantid-ip-adapter"))
    assert (adapter.format, adapter.path) == ("file", tiny["instantid-ip-adapter"])
    assert sources.component(catalog.get("dpt-hybrid-midas")).path == tiny["depth-dpt"]
    pose = catalog.get("openpose-annotators")
    assert pose.source["repo"] == "lllyasviel/Annotators" and pose.source["files"] == ["body_pose_model.pth"]
    assert pose.license["noncommercial"] and pose.license["accept"] == "openpose"
    assert sources.component(pose).path == tiny["pose-openpose"]
    assert catalog.get("458").source["files"] == ["config.json", "OpenPoseXL2.safetensors"]
    assert sources.face_root() == tiny["faces"]
    assert "non-commercial" in catalog.get("antelopev2").why and catalog.get("antelopev2").license["noncommercial"]
    hub = ModelSources(Settings(data_dir=tmp_path, model_source="hub"), catalog)
    with pytest.raises(CatalogError, match="EASEL_ACCEPT_LICENSES=antelopev2"):
        hub.face_root()  # not placed by hand: fetched only once its licence was accepted
    from easel.synthetic.tiny_faces import write_face_pack

    write_face_pack(tmp_path / "models" / "insightface")  # placed by hand: used as it is
    assert hub.face_root() == tmp_path / "models" / "insightface"


def test_component_hub_sources_fail_clearly_offline(tmp_path, monkeypatch):
    from easel.catalog import CatalogError, ModelCatalog
    from easel.config import Settings
    from easel.weights.sources import ModelSources

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at call time; no network tries
    catalog = ModelCatalog.load()
    hub = ModelSources(Settings(data_dir=tmp_path, model_source="hub"), catalog)
    for mid, repo in (("instantid-identitynet", "InstantX/InstantID"), ("instantid-ip-adapter", "InstantX/InstantID"),
                      ("454", "diffusers/controlnet-canny-sdxl-1.0")):
        with pytest.raises(CatalogError, match=repo):
            hub.component(catalog.get(mid))


def test_every_seed_scheduler_name_drives_the_instantid_pipeline(instantid, faces):
    import diffusers

    from easel.tools.common import SCHEDULERS

    base = instantid[0]
    config = dict(base.scheduler.config)
    try:
        outs = {}
        for name in SCHEDULERS:  # the seed's names except FlowMatchEulerDiscreteScheduler (refused by the tool)
            base.scheduler = getattr(diffusers, name).from_config(config)
            outs[name] = _run(instantid, faces[0].embedding, 0.8, steps=1)
            assert np.isfinite(outs[name]).all() and outs[name].std() > 0.01, name
        assert not np.array_equal(outs["DDIMScheduler"], outs["EulerDiscreteScheduler"])
    finally:
        base.scheduler = diffusers.EulerDiscreteScheduler.from_config(config)
