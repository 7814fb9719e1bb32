"""``wiro/instant-id-controlnet-lora``: InstantID on an SDXL checkpoint, with optional openpose /
depth / canny ControlNets derived from the face photo and one SDXL LoRA.

Runs on the image-tool runtime (``easel/tools/base.py``): the photo is an image input (an upload, a
``File/Upload`` name or an http(s) URL through the safe fetcher), ControlNets, condition estimators
and the face pack are components of the model cache, and the condition images are extra outputs
when asked (``extraOutputs``). The library code it calls lives in ``easel.pipelines.instantid``
(IP-Adapter, IdentityNet pipeline, ``draw_kps``, ``load_controlnet``), ``faces`` (insightface),
``conditions`` (canny, DPT depth, openpose) and ``openpose`` (controlnet_aux's OpenposeDetector).

Inputs (schema: ``easel/catalog/tools/wiro__instant-id-controlnet-lora.json``) → InstantID:

===============================  ============================================================
Wiro field                       Easel / diffusers
===============================  ============================================================
``selectedModel``                SDXL checkpoint (folder or single file), IP-Adapter attached
``selectedLoraModel``            one SDXL LoRA at its ``generatesettings`` scale
``selectedLoraModelPrivateUrl``  a LoRA URL or upload that replaces it, scale 1.0
``inputImageUrl``                the face photo (upload, ``File/Upload`` name or http(s) URL)
``selectedControlnetModel``      openpose / depth / canny ControlNets, each at its scale; their
                                 condition images come from the resized photo (openpose:
                                 controlnet_aux's OpenposeDetector, every person, as the demo)
``prompt`` / ``negativePrompt``  text prompts
``steps`` / ``scale``            ``num_inference_steps`` / ``guidance_scale``
``ip_adapter_scale``             IP-Adapter attention weight
``samples`` / ``seed``           images per request; image *i* uses ``seed + i``
``scheduler``                    scheduler class (``FlowMatchEulerDiscreteScheduler`` refused)
===============================  ============================================================

Size: as the reference demo, the photo is resized so its shorter side is 1024 and its longer side
at most 1280 px (multiples of 64), faces are analysed on that image, and the output has its size.
With ``--model-source tiny`` the sides are 1/8 of that (the tiny SDXL's images are noise anyway).
IdentityNet runs at conditioning scale 0.8, the reference demo's default (the seed has no input
for it). The procedure is the demos' (``pipeline_stable_diffusion_xl_instantid_full.py``): the
user ControlNets attend to the text, IdentityNet to the face tokens, and with
``enhance_face_region`` (beyond the seed; default true, as the demos' "Enhance non-face region")
IdentityNet and the IP-Adapter act inside the face box only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from easel.net.fetch import FetchError
from easel.weights import Checkpoint, ControlNetChoice, LoraChoice, ModelError, Precision, Weights, dtype_kwargs
from easel.weights.lora_formats import LoraFormatError
from easel.weights.precision import cast, generators, place, precision

from .base import DtypeKind, Family, ToolContext, ToolDeclaration, ToolError, ToolInputs, write_pngs
from .common import SCHEDULERS, SDXL, check_scheduler, needs_offload, parse_seed, use_scheduler

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import StableDiffusionXLPipeline
    from PIL.Image import Image

    from easel.pipelines.instantid import InstantIDAdapter

IDENTITYNET_SCALE = 0.8
IDENTITYNET, ADAPTER, DEPTH, OPENPOSE = "instantid-identitynet", "instantid-ip-adapter", "dpt-hybrid-midas", "openpose-annotators"
FLOW_MATCH = "FlowMatchEulerDiscreteScheduler"

CONDITION = DtypeKind("condition", "float16", "float16")  # DPT depth (the openpose body network stays float32: controlnet_aux feeds it float32)
# InstantID's own family: its pipeline is more than a checkpoint (ControlNets, IP-Adapter, face
# analysis); SDXL's dtypes (the VAE held in float32 when its config says force_upcast)
INSTANTID = Family(name="instantid", precision=DtypeKind("instantid", "float16", "float16", vae_upcast=True),
                   components=(CONDITION,))


class Inputs(ToolInputs):
    """The tool's inputs, as its catalog file declares them (checked when registered)."""

    selectedModel: str
    selectedModelPrivate: str = ""
    selectedLoraModel: str = ""
    selectedLoraModelPrivate: str = ""
    selectedLoraModelPrivateUrl: str = ""
    inputImageUrl: str = ""
    selectedControlnetModel: list[str] = []
    prompt: str = ""
    negativePrompt: str = ""
    steps: int = 20
    scale: float = 5.0
    ip_adapter_scale: float = 0.8
    samples: int = 1
    seed: str = ""
    scheduler: str = "DDIMScheduler"
    enhance_face_region: str = "true"
    extraOutputs: str = "false"


TOOL = ToolDeclaration(
    name="wiro/instant-id-controlnet-lora",
    catalog=Path(__file__).parents[1] / "catalog" / "tools" / "wiro__instant-id-controlnet-lora.json",
    inputs=Inputs,
    family=INSTANTID,
    uses=(SDXL,),
    fixed=(IDENTITYNET, ADAPTER, "antelopev2"),
    estimators=(("depth", DEPTH), ("openpose", OPENPOSE)),
)


@dataclass(frozen=True)
class Plan:
    """Everything ``run`` needs, resolved in the preprocess stage."""

    checkpoint: Checkpoint
    identitynet: Weights
    adapter: Weights
    faces: Weights
    photo: "Image"  # RGB
    lora: LoraChoice | None
    controlnets: tuple[ControlNetChoice, ...]
    estimators: dict[str, Weights]  # condition (depth, openpose) → its estimator's weights
    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    ip_adapter_scale: float
    samples: int
    seed: int
    scheduler: str
    enhance_face_region: bool


def prepare(inputs: Inputs, ctx: ToolContext) -> Plan:
    """Resolve the checkpoint, LoRA, ControlNets, IdentityNet, IP-Adapter, estimators, the face
    pack and the photo, all through the typed model services (``ctx.models``, ``ctx.image``).

    Raises:
        ToolError: a wrong kind of id, ``FlowMatchEulerDiscreteScheduler``, a missing face pack,
            a refused URL or file, an unset catalog source.
    """
    scheduler = inputs.scheduler or "DDIMScheduler"
    if scheduler == FLOW_MATCH:
        raise ToolError(f"scheduler {FLOW_MATCH} is a flow-matching scheduler and cannot drive an SDXL "
                        f"(epsilon-prediction) model; use one of {', '.join(SCHEDULERS)}")
    check_scheduler(scheduler)
    models = ctx.models
    try:
        checkpoint = models.checkpoint(inputs.selectedModel, "selectedModel", (SDXL.name,))
        controlnets, estimators = [], {}
        for mid in inputs.selectedControlnetModel:
            cn = models.controlnet(mid, "selectedControlnetModel", inputs.scales)
            controlnets.append(cn)
            if cn.condition in ("depth", "openpose"):
                _, estimators[cn.condition] = models.component_weights(dict(TOOL.estimators)[cn.condition],
                                                                       ("annotator",))
        _, identitynet = models.component_weights(IDENTITYNET, ("sdxl-controlnet",))
        _, adapter = models.component_weights(ADAPTER, ("sdxl-ip-adapter",))
        faces = models.face_pack()
        lora = models.private_lora(inputs.selectedLoraModelPrivateUrl, "selectedLoraModelPrivateUrl", "sd",
                                   ctx.input_file)
        if lora is None and inputs.selectedLoraModel:
            lora = models.lora(inputs.selectedLoraModel, "selectedLoraModel", "sdxl-lora", inputs.scales)
        # decoded and validated by the image-input runtime: an upload, a File/Upload name or a URL
        photo = ctx.image("inputImageUrl", inputs.inputImageUrl).convert("RGB")
    except (ModelError, FetchError, LoraFormatError) as exc:
        raise ToolError(str(exc)) from None
    seed = parse_seed(inputs.seed)
    ctx.log(f"seed={seed}")
    return Plan(
        checkpoint=checkpoint, identitynet=identitynet, adapter=adapter, faces=faces, photo=photo, lora=lora,
        controlnets=tuple(controlnets), estimators=estimators, prompt=inputs.prompt,
        negative_prompt=inputs.negativePrompt, steps=inputs.steps, guidance_scale=inputs.scale,
        ip_adapter_scale=inputs.ip_adapter_scale, samples=inputs.samples, seed=seed, scheduler=scheduler,
        enhance_face_region=inputs.enhance_face_region.lower() != "false",
    )


@dataclass(frozen=True)
class InstantIDBase:
    """The cache entry of an SDXL pipeline with the InstantID IP-Adapter attached to its UNet (the
    cache sizes it by ``components``)."""

    pipe: "StableDiffusionXLPipeline"
    adapter: "InstantIDAdapter"

    @property
    def components(self) -> dict[str, object]:
        return {**self.pipe.components, "instantid_image_proj": self.adapter.image_proj}


# -- loading ----------------------------------------------------------------------------------


def load_base(weights: Weights, adapter_weights: Weights, where: Precision | None = None) -> InstantIDBase:
    """SDXL pipeline with the InstantID IP-Adapter attached to its UNet, in ``where``'s dtypes on
    its device (default ``precision("instantid")``: float16 on CUDA, float32 on the CPU). The VAE
    is held in float32 when its config says ``force_upcast`` (``Precision.vae_dtype_for``: the SDXL
    VAE overflows in float16) and :func:`easel.pipelines.instantid.generate` decodes in its dtype."""
    from easel.pipelines.instantid import InstantIDAdapter
    from easel.pipelines.checkpoints import read_sdxl

    where = where or precision(INSTANTID.name)
    pipe = read_sdxl(weights, where.dtype)
    place(pipe, where.device)
    cast(pipe.vae, where.vae_dtype_for(pipe.vae))
    adapter = InstantIDAdapter.load(adapter_weights.path)
    adapter.attach(pipe.unet)
    return InstantIDBase(pipe, adapter)


class _Net:
    """A ControlNet held in the pipeline cache (which sizes entries by their ``components``), in
    ``where``'s dtype on its device (the UNet's: kind ``instantid``)."""

    def __init__(self, path: Path, where: Precision) -> None:
        from easel.pipelines.instantid import load_controlnet

        self.net = load_controlnet(path, **dtype_kwargs(where.dtype)).to(where.device)
        self.components = {"controlnet": self.net}


def _resize(image, tiny: bool):
    """The reference demo's ``resize_img``: shorter side 1024, longer at most 1280, multiples of 64 (1/8 for tiny)."""
    from PIL import Image

    lo, hi, base = (128, 160, 8) if tiny else (1024, 1280, 64)
    w, h = image.size
    ratio = lo / min(w, h)
    w, h = round(ratio * w), round(ratio * h)
    ratio = hi / max(w, h)
    if ratio < 1:
        w, h = round(ratio * w), round(ratio * h)
    w, h = max(base, w // base * base), max(base, h // base * base)
    return image.resize((w, h), Image.BILINEAR)


def run(plan: Plan, ctx: ToolContext) -> list[Path]:
    """Analyse the face, derive conditions, generate ``plan.samples`` images as ``0.png`` ….

    Raises:
        ToolError: no face detected (``no face detected`` in the message), an adapter or LoRA
            that does not fit, a missing condition estimator.
        easel.tools.base.TaskKilled: (from ``ctx.progress``) when the task was killed.
    """
    import torch

    from easel.pipelines.conditions import ConditionError, DepthEstimator, OpenposeEstimator, canny_condition
    from easel.pipelines.faces import FaceAnalyzer, FacePackMissing, NoFaceError
    from easel.pipelines.instantid import AdapterFormatError, build_pipeline, draw_kps, face_box_mask, generate

    models = ctx.models
    where, cond = models.precision(INSTANTID.name), models.precision(CONDITION.name)
    checkpoint = plan.checkpoint.weights
    try:
        entry = models.derived_pipeline(SDXL.name, checkpoint, f"instantid:{plan.adapter.key}",
                                        lambda: load_base(checkpoint, plan.adapter, where)).obj
        base = entry.pipe
        photo = _resize(plan.photo, models.tiny)
        face = models.component("face-analysis", plan.faces, lambda w: FaceAnalyzer(w.path)).obj.largest_face(
            photo, original_size=plan.photo.size)
        ctx.log(f"face: box={[round(float(v)) for v in face.bbox]} score={face.score:.2f}")
        images = [draw_kps(photo.size, face.kps)]
        # ControlNets and condition estimators: components, loaded once per worker, in the budget
        nets = [models.component("controlnet", plan.identitynet, lambda w: _Net(w.path, where)).obj.net]
        scales = [IDENTITYNET_SCALE]
        ctx.extra_output("identitynet-keypoints", images[0])
        for cn in plan.controlnets:
            condition = cn.condition
            nets.append(models.component("controlnet", cn.weights, lambda w: _Net(w.path, where)).obj.net)
            scales.append(cn.scale)
            if condition == "canny":
                images.append(canny_condition(photo))
            elif condition == "depth":
                est = models.component("depth", plan.estimators["depth"],
                                       lambda w: _Estimator(DepthEstimator(w.path, cond.device, cond.dtype))).obj
                images.append(est.fn(photo))
            else:
                est = models.component("openpose", plan.estimators["openpose"],
                                       lambda w: _Estimator(OpenposeEstimator(w.path, cond.device, cond.dtype))).obj
                images.append(est.fn(photo))  # every person, as the demo
            ctx.extra_output(condition, images[-1])
        models.adapters(base).apply(base, [plan.lora.triple] if plan.lora else [])
    except NoFaceError as exc:
        raise ToolError(str(exc)) from None
    except (AdapterFormatError, ConditionError, FacePackMissing, ValueError) as exc:
        raise ToolError(str(exc)) from None

    use_scheduler(models, base, plan.scheduler, always=True)
    pipe = build_pipeline(base, nets[0], nets[1:], num_tokens=entry.adapter.num_tokens)
    if where.device == "cuda" and needs_offload(sum(p.numel() * p.element_size() for c in pipe.components.values()
                                                    if hasattr(c, "parameters") for p in c.parameters()),
                                                torch.cuda.get_device_properties(0).total_memory,
                                                models.options.cpu_offload):
        pipe.enable_model_cpu_offload()

    def on_step_end(_pipe, step, _timestep, callback_kwargs):
        ctx.progress(step + 1, plan.steps)
        return callback_kwargs

    ctx.started()
    out = generate(pipe, entry.adapter, face.embedding, images, scales, plan.ip_adapter_scale, plan.prompt,
                   plan.negative_prompt, num_inference_steps=plan.steps, guidance_scale=plan.guidance_scale,
                   num_images_per_prompt=plan.samples, generator=generators(plan.seed, plan.samples),
                   face_mask=face_box_mask(photo.size, face.bbox) if plan.enhance_face_region else None,
                   callback_on_step_end=on_step_end)
    width, height = photo.size
    params = {
        "tool": TOOL.name, "model": plan.checkpoint.label, "prompt": plan.prompt, "negative_prompt": plan.negative_prompt,
        "steps": plan.steps, "guidance_scale": plan.guidance_scale, "scheduler": plan.scheduler,
        "ip_adapter_scale": plan.ip_adapter_scale, "identitynet_scale": IDENTITYNET_SCALE,
        "enhance_face_region": plan.enhance_face_region,
        "controlnets": [{"name": cn.label, "scale": cn.scale} for cn in plan.controlnets],
        "lora": {"name": plan.lora.label, "scale": plan.lora.scale} if plan.lora else None, "width": width,
        "height": height,
    }
    cns = ", ".join(f"{cn.label}:{cn.scale:g}" for cn in plan.controlnets) or "none"
    lora = f"{plan.lora.label}:{plan.lora.scale:g}" if plan.lora else "none"
    return write_pngs(out.images, ctx.output_dir, plan.seed, lambda seed: (
        f"{plan.prompt}\nNegative prompt: {plan.negative_prompt}\nSteps: {plan.steps}, Sampler: {plan.scheduler}, "
        f"CFG scale: {plan.guidance_scale:g}, Seed: {seed}, Size: {width}x{height}, Model: {plan.checkpoint.label}, "
        f"IP-Adapter scale: {plan.ip_adapter_scale:g}, ControlNets: {cns}, LoRA: {lora}"), params)


class _Estimator:
    """A condition estimator held in the pipeline cache."""

    def __init__(self, fn: Callable[..., "Image"]) -> None:
        self.fn = fn
        model = getattr(fn, "model", None)
        self.components = {"model": model} if model is not None else {}
