"""wiro/ic-light-background: the model surgery, the procedure against an independent transcription of
the reference (lllyasviel/IC-Light gradio_demo_bg.py), and the tool through the real server
(uploads, URLs, the seed's curl body with File/Upload names, flipped backgrounds, caching, bad input)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import SMALL, pixels, png_size

TOOL = "wiro/ic-light-background"


def image_bytes(size, seed, fmt="PNG", mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, fmt)
    return buf.getvalue()


FG = image_bytes((64, 96), 1)  # low-res pass 64x128 (96/64 = 1.5 rounds to 2), output 1.5x: 128x192
BG = image_bytes((80, 48), 2, "JPEG")
QUICK = {"prompt": "a woman", "negativePrompt": "bad quality", "samples": 1, "steps": 3, "scale": "2.0",
         "highres_scale": "1.5", "highres_denoise": "0.5", "seed": "7"}


# -- the model ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_pipe(tiny):
    import torch

    from easel.models.sources import Weights
    from easel.tools.sd_lora import read_pipeline

    return read_pipeline(Weights("diffusers", tiny["sd15"]), torch.float32)


def test_widened_unet_reproduces_the_base_unet_when_extra_channels_are_zero(tiny, base_pipe):
    import torch

    from easel.models.sources import Weights
    from easel.tools.ic_light import widen_conv_in
    from easel.tools.sd_lora import read_pipeline

    wide = read_pipeline(Weights("diffusers", tiny["sd15"]), torch.float32).unet
    bias = wide.conv_in.bias
    widen_conv_in(wide)
    assert wide.conv_in.in_channels == 12 and wide.conv_in.bias is bias
    assert torch.equal(wide.conv_in.weight[:, :4], base_pipe.unet.conv_in.weight)
    assert not wide.conv_in.weight[:, 4:].any()
    g = torch.Generator().manual_seed(0)
    sample, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        expected = base_pipe.unet(sample, 10, ctx).sample
        got = wide(torch.cat([sample, torch.zeros(2, 8, 16, 16)], 1), 10, ctx).sample
        other = wide(torch.cat([sample, torch.randn(2, 8, 16, 16, generator=g)], 1), 10, ctx).sample
    assert torch.allclose(got, expected, atol=1e-5) and torch.equal(other, got)  # zero weights ignore them


def test_offset_is_added_once_and_must_match_the_unet(tiny, base_pipe):
    import torch
    from safetensors.torch import load_file

    from easel.models.sources import Weights
    from easel.tools.ic_light import merge_offset, widen_conv_in
    from easel.tools.sd_lora import read_pipeline

    unet = read_pipeline(Weights("diffusers", tiny["sd15"]), torch.float32).unet
    widen_conv_in(unet)
    offset = load_file(str(tiny["iclight-fbc"]))
    merge_offset(unet, offset, "tiny")
    base = base_pipe.unet.state_dict()
    for key, value in unet.state_dict().items():
        origin = base[key] if key != "conv_in.weight" else torch.cat([base[key], torch.zeros(32, 8, 3, 3)], 1)
        assert torch.equal(value, origin + offset[key]), key
    with pytest.raises(ValueError, match="never merged twice"):
        merge_offset(unet, offset, "tiny")
    fresh = read_pipeline(Weights("diffusers", tiny["sd15"]), torch.float32).unet
    with pytest.raises(ValueError, match="does not match|other shapes"):  # not widened: conv_in shapes differ
        merge_offset(fresh, offset, "tiny")


@pytest.fixture(scope="module")
def procedure_inputs(tiny):
    from easel.models.rmbg import load_rmbg

    fg = Image.open(io.BytesIO(FG)).convert("RGB")
    bg = Image.open(io.BytesIO(BG)).convert("RGB")
    return load_rmbg(tiny["rmbg"]), fg, bg


def _reference_process(tiny, rmbg, fg_img, bg_img, prompt, n_prompt, num_samples, seed, steps, cfg, hs, hd,
                       flip=False):
    """The reference procedure, transcribed step by step in its own structure: separately loaded
    modules, conv_in swapped, the forward monkey-patched to read ``concat_conds`` from
    ``cross_attention_kwargs``, the offset merged by ``load_state_dict`` of the sums, one
    DPM++ 2M SDE Karras scheduler shared by a text-to-image and an image-to-image pipeline."""
    import torch
    from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline,
                           StableDiffusionPipeline, UNet2DConditionModel)
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer

    root = str(tiny["sd15"])
    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet")
    with torch.no_grad():
        conv = torch.nn.Conv2d(12, unet.conv_in.out_channels, unet.conv_in.kernel_size, unet.conv_in.stride,
                               unet.conv_in.padding)
        conv.weight.zero_()
        conv.weight[:, :4, :, :].copy_(unet.conv_in.weight)
        conv.bias = unet.conv_in.bias
        unet.conv_in = conv
    original_forward = unet.forward

    def hooked(sample, timestep, encoder_hidden_states, **kwargs):
        c = kwargs["cross_attention_kwargs"]["concat_conds"].to(sample)
        c = torch.cat([c] * (sample.shape[0] // c.shape[0]), dim=0)
        kwargs["cross_attention_kwargs"] = {}
        return original_forward(torch.cat([sample, c], dim=1), timestep, encoder_hidden_states, **kwargs)

    unet.forward = hooked
    offset, origin = load_file(str(tiny["iclight-fbc"])), unet.state_dict()
    unet.load_state_dict({k: origin[k] + offset[k] for k in origin}, strict=True)
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, steps_offset=1)
    parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sched,
                 safety_checker=None, requires_safety_checker=False, feature_extractor=None)
    t2i, i2i = StableDiffusionPipeline(**parts), StableDiffusionImg2ImgPipeline(**parts)

    def enc(txt):
        ids = tokenizer(txt, truncation=False, add_special_tokens=False)["input_ids"]
        chunks = [[tokenizer.bos_token_id] + ids[i:i + 75] + [tokenizer.eos_token_id] for i in range(0, len(ids), 75)]
        chunks = [c + [tokenizer.eos_token_id] * (77 - len(c)) for c in chunks]
        return text_encoder(torch.tensor(chunks)).last_hidden_state

    def to_t(imgs):
        return (torch.from_numpy(np.stack(imgs, 0)).float() / 127.0 - 1.0).movedim(-1, 1)

    def to_np(imgs, quant=True):
        out = []
        for x in imgs:
            y = x.movedim(0, -1)
            out.append((y * 127.5 + 127.5).numpy().clip(0, 255).astype(np.uint8) if quant
                       else (y * 0.5 + 0.5).numpy().clip(0, 1).astype(np.float32))
        return out

    def crop(img, w, h):
        p = Image.fromarray(img)
        s = max(w / p.size[0], h / p.size[1])
        rw, rh = int(round(p.size[0] * s)), int(round(p.size[1] * s))
        p = p.resize((rw, rh), Image.LANCZOS)
        return np.array(p.crop(((rw - w) / 2, (rh - h) / 2, (rw + w) / 2, (rh + h) / 2)))

    with torch.inference_mode():
        img = np.array(fg_img)
        H, W, _ = img.shape
        k = (256.0 / float(H * W)) ** 0.5
        feed = np.array(Image.fromarray(img).resize((int(64 * round(W * k)), int(64 * round(H * k))), Image.LANCZOS))
        alpha = torch.nn.functional.interpolate(rmbg(to_t([feed])), size=(H, W), mode="bilinear")
        alpha = alpha.movedim(1, -1)[0].numpy().clip(0, 1)
        input_fg = (127 + (img.astype(np.float32) - 127) * alpha).clip(0, 255).astype(np.uint8)
        input_bg = np.array(bg_img)
        if flip:
            input_bg = np.fliplr(input_bg)
        width, height = int(round(W / 64)) * 64, int(round(H / 64)) * 64
        rng = torch.Generator().manual_seed(seed)
        cc = vae.encode(to_t([crop(input_fg, width, height), crop(input_bg, width, height)])).latent_dist.mode()
        cc = torch.cat([c[None] for c in cc * vae.config.scaling_factor], dim=1)
        c, uc = enc(prompt + ", best quality"), enc(n_prompt)
        c, uc = torch.cat(list(c), 0)[None], torch.cat(list(uc), 0)[None]
        lat = t2i(prompt_embeds=c, negative_prompt_embeds=uc, width=width, height=height, num_inference_steps=steps,
                  num_images_per_prompt=num_samples, generator=rng, output_type="latent", guidance_scale=cfg,
                  cross_attention_kwargs={"concat_conds": cc}).images / vae.config.scaling_factor
        pix = to_np(vae.decode(lat).sample)
        tw, th = int(round(width * hs / 64.0) * 64), int(round(height * hs / 64.0) * 64)
        pix = [np.array(Image.fromarray(p).resize((tw, th), Image.LANCZOS)) for p in pix]
        lat = vae.encode(to_t(pix)).latent_dist.mode() * vae.config.scaling_factor
        height, width = lat.shape[2] * 8, lat.shape[3] * 8
        cc = vae.encode(to_t([crop(input_fg, width, height), crop(input_bg, width, height)])).latent_dist.mode()
        cc = torch.cat([c_[None] for c_ in cc * vae.config.scaling_factor], dim=1)
        lat = i2i(image=lat, strength=hd, prompt_embeds=c, negative_prompt_embeds=uc, width=width, height=height,
                  num_inference_steps=int(round(steps / hd)), num_images_per_prompt=num_samples, generator=rng,
                  output_type="latent", guidance_scale=cfg, cross_attention_kwargs={"concat_conds": cc}).images
        out = to_np(vae.decode(lat / vae.config.scaling_factor).sample, quant=False)
    return [(x * 255.0).clip(0, 255).astype(np.uint8) for x in out]


def test_procedure_equals_the_reference(tiny, procedure_inputs):
    from easel.models.sources import Weights
    from easel.tools import ic_light

    rmbg, fg, bg = procedure_inputs
    pipe = ic_light.load_iclight(Weights("diffusers", tiny["sd15"]), tiny["iclight-fbc"])
    args = ("a woman", "bad quality", 2, 123, 3, 2.0, 1.5, 0.5)
    ours, extras = ic_light.process(pipe, rmbg, fg, bg, ic_light.UPLOAD_FLIP, *args)
    ref = _reference_process(tiny, rmbg, fg, bg, *args, flip=True)
    assert [o.shape for o in ours] == [(192, 128, 3)] * 2
    for a, b in zip(ours, ref):
        assert np.array_equal(a, b)
    assert not np.array_equal(ours[0], ours[1])  # two samples of one batch
    assert extras["alpha"].shape == (96, 64) and extras["foreground"].shape == (96, 64, 3)


def test_zero_offset_equals_the_base_model_fed_the_same_conditioning(tiny, tmp_path, procedure_inputs):
    import torch
    from safetensors.torch import load_file, save_file

    from easel.models.sources import Weights
    from easel.tools import ic_light
    from easel.tools.sd_lora import read_pipeline

    zero = tmp_path / "zero.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in load_file(str(tiny["iclight-fbc"])).items()}, str(zero))
    rmbg, fg, bg = procedure_inputs
    iclight = ic_light.load_iclight(Weights("diffusers", tiny["sd15"]), zero)
    base = read_pipeline(Weights("diffusers", tiny["sd15"]), torch.float32)
    base.scheduler = ic_light.make_scheduler()

    def drop_concat(_m, args, kwargs):  # the plain UNet, given the same prompt, latents and noise
        return args, {**kwargs, "cross_attention_kwargs": None}

    base.unet.register_forward_pre_hook(drop_concat, with_kwargs=True)
    args = (ic_light.UPLOAD, "a woman", "bad quality", 1, 5, 3, 2.0, 1.5, 0.5)
    a, _ = ic_light.process(iclight, rmbg, fg, bg, *args)
    b, _ = ic_light.process(base, rmbg, fg, bg, *args)
    diff = np.abs(a[0].astype(int) - b[0].astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01  # float summation order only
    c, _ = ic_light.process(ic_light.load_iclight(Weights("diffusers", tiny["sd15"]), tiny["iclight-fbc"]),
                            rmbg, fg, bg, *args)
    assert np.abs(c[0].astype(int) - a[0].astype(int)).mean() > 1  # a non-zero offset changes the result


# -- through the server ------------------------------------------------------------------------

def upload(server, project, name: str, data: bytes) -> dict:
    r = server.post(project, "/v1/File/Upload", files={"file": (name, data)}).json()
    assert r["result"], r
    return r["list"][0]


def run_ok(server, project, body, timeout=240, **kw):
    answer = server.run(project, body, tool=TOOL, **kw)
    assert answer["result"], answer
    task = server.wait(project, answer["taskid"], timeout=timeout)
    assert task["pexit"] == "0", task["debugerror"]
    return task


def test_seed_curl_body_with_file_upload_names(server, project):
    upload(server, project, "bg-img2.png", BG)
    upload(server, project, "ic-light.png", FG)
    body = {"selectedModel": "", "selectedModelPrivate": "", "inputImageUrl": "bg-img2.png",
            "inputImage2Url": "ic-light.png", "prompt": "a woman", "negativePrompt": "bad quality", "samples": 1,
            "steps": 30, "scale": "2.0", "highres_scale": "1.5", "highres_denoise": "0.5", "seed": "123456",
            "bg_source": "Use Background Image",
            "callbackUrl": "You can provide a callback URL; Wiro will send a POST request to it when the task is completed."}
    r = server.post(project, f"/v1/Run/{TOOL}", headers={"Content-Type": "multipart/form-data"},
                    content=json.dumps(body))
    assert r.json()["result"], r.text
    task = server.wait(project, r.json()["taskid"], timeout=900)  # 61 steps: slow on a loaded 2-core box
    assert task["pexit"] == "0", task["debugerror"]
    assert [o["name"] for o in task["outputs"]] == ["0.png"]
    (img,) = server.images(task)
    assert png_size(img) == (128, 192)
    progress = task["progress"]  # one bar over matting, the low-res pass and the high-res pass
    assert progress["task"] == "High-res pass" and progress["stepTotal"] == str(1 + 30 + 30)
    assert progress["stepCurrent"] == progress["stepTotal"]
    assert "IC-Light model" in task["debugoutput"] and "RMBG-1.4 matting" in task["debugoutput"]


def test_multipart_aliases_urls_flip_extras_and_caching(server, project, file_server):
    base_url, folder = file_server
    (folder / "fg.png").write_bytes(FG)
    (folder / "bg.jpg").write_bytes(BG)
    flipped = io.BytesIO()
    Image.open(io.BytesIO(BG)).transpose(Image.FLIP_LEFT_RIGHT).save(flipped, "PNG")
    # multipart files under Wiro's aliases, the flipped-background option, extra outputs
    files = {"inputImage": ("bg.jpg", BG), "inputImage2": ("fg.png", FG)}
    data = {**QUICK, "bg_source": "Use Flipped Background Image", "extraOutputs": "true"}
    r = server.post(project, f"/v1/Run/{TOOL}", files=files, data=data).json()
    assert r["result"], r
    task = server.wait(project, r["taskid"], timeout=240)
    assert task["pexit"] == "0", task["debugerror"]
    names = [o["name"] for o in task["outputs"]]
    assert names == ["0.png", "extra-alpha.png", "extra-background.png", "extra-foreground.png"]
    imgs = server.images(task)
    assert png_size(imgs[0]) == (128, 192) and png_size(imgs[3]) == (64, 96)
    flip_pixels = pixels(imgs[:1])
    # the same through URLs to a local server, with a background the test flipped itself
    (folder / "bg-flipped.png").write_bytes(flipped.getvalue())
    url_task = run_ok(server, project, {**QUICK, "inputImageUrl": f"{base_url}/bg-flipped.png",
                                        "inputImage2Url": f"{base_url}/fg.png", "bg_source": "Use Background Image"})
    assert pixels(server.images(url_task)) == flip_pixels
    # the cached model is reused (offset not merged again): same seed, same pixels; an Easel URL is read locally
    used_bg = task["outputs"][2]["url"]  # extra-background.png: the flipped background as used
    again = run_ok(server, project, {**QUICK, "inputImageUrl": used_bg, "inputImage2Url": f"{base_url}/fg.png",
                                     "bg_source": "Use Background Image"})
    assert "resident, reused" in again["debugoutput"] and "inputImageUrl: fetched" not in again["debugoutput"]
    assert "inputImage2Url: fetched" in again["debugoutput"]
    assert pixels(server.images(again)) == flip_pixels
    plain = run_ok(server, project, {**QUICK, "inputImageUrl": f"{base_url}/bg.jpg", "inputImage2Url": f"{base_url}/fg.png"})
    assert pixels(server.images(plain)) != flip_pixels


def test_sd_tool_output_is_unchanged_by_an_ic_light_task_in_the_same_worker(server, project):
    first = server.wait(project, server.run(project, SMALL)["taskid"])  # the session server has one worker
    assert first["pexit"] == "0", first["debugerror"]
    upload(server, project, "fg.png", FG)
    upload(server, project, "bg.png", BG)
    run_ok(server, project, {**QUICK, "inputImageUrl": "bg.png", "inputImage2Url": "fg.png"})
    second = server.wait(project, server.run(project, SMALL)["taskid"])
    assert second["pexit"] == "0", second["debugerror"]
    assert pixels(server.images(second)) == pixels(server.images(first))


def test_bad_inputs_name_the_field(server, project, file_server):
    from test_runtime import bomb_png

    base_url, folder = file_server
    upload(server, project, "ok.png", FG)

    def refused(body, files=None):
        if files:
            r = server.post(project, f"/v1/Run/{TOOL}", files=files, data=body).json()
        else:
            r = server.post(project, f"/v1/Run/{TOOL}", json=body).json()
        assert r["result"] is False, r
        error = r["errors"][0]  # Wiro's documented text, Easel's explanation in "detail"
        return f"{error['message']} {error.get('detail', '')}"

    assert "[inputImage2Url] required" in refused({**QUICK, "inputImageUrl": "ok.png"})
    assert "[inputImageUrl] required" in refused({**QUICK, "inputImage2Url": "ok.png"})
    assert "[inputImageUrl]" in refused({**QUICK, "inputImageUrl": "never-uploaded.png", "inputImage2Url": "ok.png"})
    msg = refused({**QUICK, "inputImageUrl": "ok.png"}, files={"inputImage2": ("notes.png", b"just text")})
    assert "[inputImage2Url] is not an image" in msg
    upload(server, project, "bomb.png", bomb_png())
    msg = refused({**QUICK, "inputImageUrl": "bomb.png", "inputImage2Url": "ok.png"})
    assert "[inputImageUrl]" in msg and "decompression bomb" in msg
    assert "[highres_denoise]" in refused({**QUICK, "inputImageUrl": "ok.png", "inputImage2Url": "ok.png",
                                           "highres_denoise": "0.05"})
    # URLs are only known when fetched: pexit 1, the reason (naming the field) in debugerror
    (folder / "big.png").write_bytes(bomb_png(5000, 5000))
    (folder / "text.png").write_bytes(b"not an image at all")
    for name, reason in (("big.png", "EASEL_MAX_IMAGE_PIXELS"), ("text.png", "is not an image"),
                         ("missing.png", "HTTP 404")):
        answer = server.run(project, {**QUICK, "inputImageUrl": "ok.png", "inputImage2Url": f"{base_url}/{name}"},
                            tool=TOOL)
        task = server.wait(project, answer["taskid"])
        assert task["pexit"] == "1" and "[inputImage2Url]" in task["debugerror"] and reason in task["debugerror"], \
            task["debugerror"]
        assert task["outputs"] == []
