"""The InstantID tool (draft module on the current ToolContext) through the real server: an
uploaded photo with a tiny "face", ControlNets, a LoRA, no face, and the flow-matching scheduler."""
from __future__ import annotations

import io

from PIL import Image

from conftest import png_size, pixels
from easel.models.tiny_faces import draw_test_face

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


def test_instantid_photo_by_url_and_an_unavailable_openpose_estimator(server, project, file_server):
    base_url, folder = file_server
    (folder / "portrait.png").write_bytes(_photo_bytes())
    task = server.wait(project, server.run(project, {**BASE, "inputImageUrl": f"{base_url}/portrait.png"}, tool=TOOL)["taskid"],
                       timeout=300)
    assert task["pexit"] == "0", task["debugerror"]
    # openpose needs controlnet_aux (optional, not installed here): a clear error, not a stack trace
    pose = _run(server, project, {**BASE, "selectedControlnetModel": "458"})
    assert pose["pexit"] == "1" and "controlnet_aux" in pose["debugerror"]
