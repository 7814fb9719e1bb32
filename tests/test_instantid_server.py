"""The InstantID tool through the real server: an uploaded photo with a tiny "face" and a photo by
URL, zero, one, two and three ControlNets (openpose, depth, canny) with their condition images as
extra outputs, a LoRA, no face, and the flow-matching scheduler."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from conftest import png_size, pixels
from easel.synthetic.tiny_faces import draw_test_face

TOOL = "wiro/instant-id-controlnet-lora"
BASE = {"selectedModel": "79", "selectedLoraModel": "", "selectedControlnetModel": "", "prompt": "a portrait",
        "negativePrompt": "blurry", "steps": "2", "scale": "5.0", "ip_adapter_scale": "0.8", "samples": "1",
        "seed": "7", "scheduler": "DDIMScheduler"}


def _photo_bytes(face: bool = True) -> bytes:
    image = Image.new("RGB", (96, 128), (128, 128, 128))
    if face:
        draw_test_face(image, (30, 40, 62, 80), 0)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _run(server, project, fields: dict, face: bool = True) -> dict:
    r = server.post(project, f"/v1/Run/{TOOL}", data=fields,
                    files={"inputImageUrl": ("portrait.png", _photo_bytes(face), "image/png")})
    answer = r.json()
    assert answer["result"], answer
    return server.wait(project, answer["taskid"], timeout=300)


def test_instantid_runs_with_an_uploaded_photo_controlnets_and_a_lora(server, project):
    plain = _run(server, project, BASE)
    assert plain["pexit"] == "0", plain["debugerror"]
    assert "face: box=" in plain["debugoutput"]
    # insightface's internal FutureWarning (scikit-image's deprecated `estimate`, on every face) stays out
    assert "FutureWarning" not in plain["debugerror"], plain["debugerror"]
    images = server.images(plain)
    assert len(images) == 1 and png_size(images[0]) == (120, 160)  # reference resize (1/8 scale for tiny): 128 short side, 160 long at most
    styled = _run(server, project, {**BASE, "selectedLoraModel": "80", "selectedControlnetModel": "454,455",
                                    "controlnet-canny-sdxl-1.0": "0.7"})
    assert styled["pexit"] == "0", styled["debugerror"]
    assert pixels(server.images(styled)) != pixels(images)
    assert [o["name"] for o in styled["outputs"]] == ["0.png"]  # no condition images unless asked
    extras = _run(server, project, {**BASE, "selectedControlnetModel": "454,455", "extraOutputs": "true"})
    assert extras["pexit"] == "0", extras["debugerror"]
    assert sorted(o["name"] for o in extras["outputs"]) == [
        "0.png", "extra-canny.png", "extra-depth.png", "extra-identitynet-keypoints.png"]
    by_name = dict(zip([o["name"] for o in extras["outputs"]], server.images(extras)))
    assert all(png_size(by_name[n]) == (120, 160) for n in by_name)  # conditions at the generation size
    assert by_name["0.png"] != by_name["extra-canny.png"]


def test_instantid_documented_failures(server, project):
    noface = _run(server, project, BASE, face=False)
    assert noface["pexit"] == "1" and "no face detected" in noface["debugerror"]
    assert "96x128 image" in noface["debugerror"], noface["debugerror"]  # the upload's size, not the analysed copy's
    flow = _run(server, project, {**BASE, "scheduler": "FlowMatchEulerDiscreteScheduler"})
    assert flow["pexit"] == "1" and "scheduler" in flow["debugerror"] and "DDIMScheduler" in flow["debugerror"]


def test_sd_and_flux_outputs_are_unchanged_by_an_instantid_task_in_the_same_worker(server, project):
    from conftest import SMALL
    from test_flux import FLUX, FLUX_SMALL

    def images(tool, params):
        task = server.wait(project, server.run(project, params, tool=tool)["taskid"], timeout=300)
        assert task["pexit"] == "0", task["debugerror"]
        return pixels(server.images(task))

    sd, flux = images("wiro/text-to-image-sd-lora", SMALL), images(FLUX, FLUX_SMALL)
    task = _run(server, project, {**BASE, "selectedLoraModel": "80"})
    assert task["pexit"] == "0", task["debugerror"]
    assert images("wiro/text-to-image-sd-lora", SMALL) == sd and images(FLUX, FLUX_SMALL) == flux


def test_instantid_photo_by_url_with_one_controlnet(server, project, file_server):
    base_url, folder = file_server
    (folder / "portrait.png").write_bytes(_photo_bytes())
    params = {**BASE, "inputImageUrl": f"{base_url}/portrait.png", "selectedControlnetModel": "458"}
    task = server.wait(project, server.run(project, params, tool=TOOL)["taskid"], timeout=300)
    assert task["pexit"] == "0", task["debugerror"]
    assert [o["name"] for o in task["outputs"]] == ["0.png"]
    assert png_size(server.images(task)[0]) == (120, 160)


def test_instantid_with_openpose_depth_and_canny_and_the_openpose_condition_as_an_extra_output(server, project, tiny):
    from controlnet_aux.open_pose import Body, OpenposeDetector

    fields = {**BASE, "selectedControlnetModel": "458,455,454", "controlnet-openpose-sdxl-1.0": "0.9",
              "extraOutputs": "true"}
    task = _run(server, project, fields)
    assert task["pexit"] == "0", task["debugerror"]
    names = [o["name"] for o in task["outputs"]]
    assert names[0] == "0.png" and sorted(names[1:]) == [
        "extra-canny.png", "extra-depth.png", "extra-identitynet-keypoints.png", "extra-openpose.png"]
    by_name = dict(zip(names, server.images(task)))
    pose = np.asarray(Image.open(io.BytesIO(by_name["extra-openpose.png"])).convert("RGB"))
    assert pose.shape == (160, 120, 3)
    # controlnet_aux's detector as InstantID's demo calls it, on the photo the tool resized (120×160)
    photo = Image.open(io.BytesIO(_photo_bytes())).convert("RGB").resize((120, 160), Image.BILINEAR)
    detector = OpenposeDetector(Body(str(tiny["pose-openpose"] / "body_pose_model.pth")))
    expected = np.asarray(detector(photo).resize((120, 160)))
    # pixel-equal within one process (tests/test_openpose.py); the worker runs torch with its own
    # thread count, whose float summation order moves a few near-tied peaks of the random tiny net
    assert (pose != expected).any(axis=-1).mean() < 0.1
    assert (pose > 0).any(axis=-1).mean() > 0.05  # the tiny body network finds "people" in it
    # the same request without openpose gives another image: the openpose ControlNet acts
    without = _run(server, project, {**BASE, "selectedControlnetModel": "455,454"})
    assert without["pexit"] == "0", without["debugerror"]
    assert pixels(server.images(without)) != pixels([by_name["0.png"]])


def test_the_seeds_curl_body_verbatim_with_its_photo_uploaded_first(server, project):
    """The seed's own request, byte for byte, after uploading the photo it names with File/Upload."""
    import json

    from test_conformance import SEED_FILES, seed_curl, seed_sections

    (seed,) = [f for f in SEED_FILES if f.name.startswith("001_")]
    url, headers, body = seed_curl(seed_sections(seed)["Run Command - Make HTTP Post Request"])
    assert url.endswith(f"/v1/Run/{TOOL}") and json.loads(body)["inputImageUrl"] == "input-portrait-2.jpg"
    photo = io.BytesIO()
    Image.open(io.BytesIO(_photo_bytes())).save(photo, "JPEG", quality=95)
    up = server.post(project, "/v1/File/Upload", files={"file": ("input-portrait-2.jpg", photo.getvalue(), "image/jpeg")})
    assert up.json()["result"] is True, up.text
    r = server.post(project, f"/v1/Run/{TOOL}", headers={"Content-Type": headers["Content-Type"]}, content=body.encode())
    assert r.json()["result"], r.text
    task = server.wait(project, r.json()["taskid"], timeout=600)
    assert task["pexit"] == "0", task["debugerror"]
    assert [o["name"] for o in task["outputs"]] == ["0.png"] and png_size(server.images(task)[0]) == (120, 160)
    assert "seed=3572004920" in task["debugoutput"]
