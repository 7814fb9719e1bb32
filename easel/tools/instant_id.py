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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from easel.catalog import CatalogError
from easel.weights import Precision, dtype_kwargs
from easel.pipelines.conditions import ConditionError
from easel.pipelines.faces import FacePackMissing, NoFaceError
from easel.net.fetch import FetchError, check_safetensors
from easel.pipelines.instantid import AdapterFormatError
from easel.weights.lora_formats import LoraFormatError, require_family
from easel.weights.precision import cast, generators, place, precision

from .base import ToolContext, ToolError, write_pngs
from .flux_lora import needs_offload
from .sd_lora import SCHEDULERS, parse_seed

TOOL = "wiro/instant-id-controlnet-lora"
IDENTITYNET_SCALE = 0.8
IDENTITYNET, ADAPTER, DEPTH, OPENPOSE = "instantid-identitynet", "instantid-ip-adapter", "dpt-hybrid-midas", "openpose-annotators"
FLOW_MATCH = "FlowMatchEulerDiscreteScheduler"


@dataclass
class Plan:
    """Everything ``run`` needs, resolved in the preprocess stage."""

    checkpoint: Any  # easel.weights.Weights
    checkpoint_label: str
    identitynet: Any
    adapter: Any
    face_root: Path
    photo: Any  # PIL.Image, RGB
    lora: tuple[str, str, float, str] | None = None  # key, path, scale, label
    controlnets: list[tuple[str, Any, float, str, str]] = field(default_factory=list)  # id, weights, scale, condition, label
    estimators: dict[str, Any] = field(default_factory=dict)  # condition → weights
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    guidance_scale: float = 5.0
    ip_adapter_scale: float = 0.8
    samples: int = 1
    seed: int = 0
    scheduler: str = "DDIMScheduler"
    enhance_face_region: bool = True


def _lora(inputs: dict, ctx: ToolContext) -> tuple[str, str, float, str] | None:
    models = ctx.models
    url = (inputs.get("selectedLoraModelPrivateUrl") or "").strip()
    if url:
        if url.startswith("upload:"):
            path = ctx.input_file(url)
            check_safetensors(path)
            key = f"upload:{path.name}"
        else:
            w = models.sources.lora_from_url(url)
            path, key = w.path, w.key
        require_family(path, "sd", "selectedLoraModelPrivateUrl")
        return key, str(path), 1.0, url
    chosen = inputs.get("selectedLoraModel")
    chosen = chosen[0] if isinstance(chosen, list) and chosen else chosen
    if not chosen:
        return None
    entry = models.catalog.get(chosen)
    if entry.kind != "sdxl-lora":
        raise ToolError(f"selectedLoraModel {entry.id} ({entry.label}) is a {entry.kind}; this tool takes sdxl LoRAs")
    scale = float(inputs.get(entry.generatesettings[0]["id"], 1.0)) if entry.generatesettings else 1.0
    w = models.sources.lora(entry)
    return f"{entry.id}:{w.key}", str(w.path), scale, entry.label


def prepare(inputs: dict[str, Any], ctx: ToolContext) -> Plan:
    """Resolve the checkpoint, LoRA, ControlNets, IdentityNet, IP-Adapter, estimators and the photo.

    Raises:
        ToolError: a wrong kind of id, ``FlowMatchEulerDiscreteScheduler``, a missing face pack,
            a refused URL or file, an unset catalog source.
    """
    scheduler = inputs.get("scheduler") or "DDIMScheduler"
    if scheduler == FLOW_MATCH:
        raise ToolError(f"scheduler {FLOW_MATCH} is a flow-matching scheduler and cannot drive an SDXL "
                        f"(epsilon-prediction) model; use one of {', '.join(SCHEDULERS)}")
    if scheduler not in SCHEDULERS:
        raise ToolError(f"scheduler must be one of {', '.join(SCHEDULERS)}")
    models = ctx.models
    catalog = models.catalog
    try:
        entry = catalog.get(inputs["selectedModel"])
        if entry.kind != "sdxl":
            raise ToolError(f"selectedModel {entry.id} ({entry.label}) is a {entry.kind} model; this tool runs sdxl checkpoints")
        checkpoint = models.sources.checkpoint(entry)
        controlnets, estimators = [], {}
        for mid in inputs.get("selectedControlnetModel") or []:
            cn = catalog.get(mid)
            if cn.kind != "sdxl-controlnet" or not cn.condition:
                raise ToolError(f"selectedControlnetModel {mid} ({cn.label}) is not an openpose/depth/canny SDXL ControlNet")
            scale = float(inputs.get(cn.generatesettings[0]["id"], 1.0)) if cn.generatesettings else 1.0
            controlnets.append((cn.id, models.sources.component(cn), scale, cn.condition, cn.label))
            if cn.condition in ("depth", "openpose"):
                est = catalog.get(DEPTH if cn.condition == "depth" else OPENPOSE)
                estimators[cn.condition] = models.sources.component(est)
        identitynet = models.sources.component(catalog.get(IDENTITYNET))
        adapter = models.sources.component(catalog.get(ADAPTER))
        face_root = models.sources.face_root()
        from easel.pipelines.faces import check_pack

        check_pack(face_root)
        lora = _lora(inputs, ctx)
        # decoded and validated by the image-input runtime: an upload, a File/Upload name or a URL
        photo = ctx.image("inputImageUrl", inputs.get("inputImageUrl", "")).convert("RGB")
    except (CatalogError, FetchError, LoraFormatError, FacePackMissing, ConditionError) as exc:
        raise ToolError(str(exc)) from None
    seed = parse_seed(inputs.get("seed", ""))
    ctx.log(f"seed={seed}")
    return Plan(
        checkpoint=checkpoint, checkpoint_label=entry.label, identitynet=identitynet, adapter=adapter,
        face_root=face_root, photo=photo, lora=lora, controlnets=controlnets, estimators=estimators,
        prompt=inputs.get("prompt", ""), negative_prompt=inputs.get("negativePrompt", ""), steps=int(inputs["steps"]),
        guidance_scale=float(inputs["scale"]), ip_adapter_scale=float(inputs["ip_adapter_scale"]),
        samples=int(inputs["samples"]), seed=seed, scheduler=scheduler,
        enhance_face_region=str(inputs.get("enhance_face_region", "true")).lower() != "false",
    )


# -- loading ----------------------------------------------------------------------------------


def load_base(weights, adapter_weights, where: Precision | None = None) -> Any:
    """SDXL pipeline with the InstantID IP-Adapter attached to its UNet, in ``where``'s dtypes on
    its device (default ``precision("instantid")``: float16 on CUDA, float32 on the CPU). The VAE
    is held in float32 when its config says ``force_upcast`` (``Precision.vae_dtype_for``: the SDXL
    VAE overflows in float16) and :func:`easel.pipelines.instantid.generate` decodes in its dtype."""
    from diffusers import StableDiffusionXLPipeline

    from easel.pipelines.instantid import InstantIDAdapter

    where = where or precision("instantid")
    kwargs = dict(**dtype_kwargs(where.dtype), add_watermarker=False)
    if weights.format == "diffusers":
        pipe = StableDiffusionXLPipeline.from_pretrained(str(weights.path), use_safetensors=True, **kwargs)
    else:
        if weights.config is not None:
            kwargs["config"] = str(weights.config)
        pipe = StableDiffusionXLPipeline.from_single_file(str(weights.path), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    place(pipe, where.device)
    cast(pipe.vae, where.vae_dtype_for(pipe.vae))
    adapter = InstantIDAdapter.load(adapter_weights.path)
    adapter.attach(pipe.unet)
    pipe._easel_instantid = adapter
    return pipe


class _Net:
    """A ControlNet held in the pipeline cache (which sizes entries by their ``components``), in
    ``where``'s dtype on its device (the UNet's: kind ``instantid``)."""

    def __init__(self, path: Path, where: Precision):
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
    import diffusers
    import torch

    from easel.pipelines.conditions import DepthEstimator, OpenposeEstimator, canny_condition
    from easel.pipelines.instantid import build_pipeline, draw_kps, face_box_mask, generate

    models = ctx.models
    tiny = models.settings.model_source == "tiny"
    where, cond = models.precision("instantid"), models.precision("condition")
    try:
        base = models.pipeline(f"sdxl-instantid:{plan.checkpoint.key}:{plan.adapter.key}",
                               lambda: load_base(plan.checkpoint, plan.adapter, where))
        photo = _resize(plan.photo, tiny)
        from easel.weights import Weights
        from easel.pipelines.faces import FaceAnalyzer

        pack = Weights("folder", plan.face_root, key=f"faces:{plan.face_root}")
        face = models.component("face-analysis", pack, lambda w: FaceAnalyzer(w.path)).obj.largest_face(
            photo, original_size=plan.photo.size)
        ctx.log(f"face: box={[round(float(v)) for v in face.bbox]} score={face.score:.2f}")
        images = [draw_kps(photo.size, face.kps)]
        # ControlNets and condition estimators: components, loaded once per worker, in the budget
        nets = [models.component("controlnet", plan.identitynet, lambda w: _Net(w.path, where)).obj.net]
        scales = [IDENTITYNET_SCALE]
        ctx.extra_output("identitynet-keypoints", images[0])
        for _, weights, scale, condition, _ in plan.controlnets:
            nets.append(models.component("controlnet", weights, lambda w: _Net(w.path, where)).obj.net)
            scales.append(scale)
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
        models.adapters(base).apply(base, [plan.lora[:3]] if plan.lora else [])
    except NoFaceError as exc:
        raise ToolError(str(exc)) from None
    except (AdapterFormatError, ConditionError, FacePackMissing, ValueError) as exc:
        raise ToolError(str(exc)) from None

    base_scheduler = getattr(base, "_easel_base_scheduler_config", None)
    if base_scheduler is None:
        base_scheduler = base._easel_base_scheduler_config = dict(base.scheduler.config)
    base.scheduler = getattr(diffusers, plan.scheduler).from_config(base_scheduler)
    pipe = build_pipeline(base, nets[0], nets[1:], num_tokens=base._easel_instantid.num_tokens)
    if where.device == "cuda" and needs_offload(sum(p.numel() * p.element_size() for c in pipe.components.values()
                                                    if hasattr(c, "parameters") for p in c.parameters()),
                                                torch.cuda.get_device_properties(0).total_memory,
                                                models.settings.cpu_offload):
        pipe.enable_model_cpu_offload()

    def on_step_end(_pipe, step, _timestep, callback_kwargs):
        ctx.progress(step + 1, plan.steps)
        return callback_kwargs

    ctx.started()
    out = generate(pipe, base._easel_instantid, face.embedding, images, scales, plan.ip_adapter_scale, plan.prompt,
                   plan.negative_prompt, num_inference_steps=plan.steps, guidance_scale=plan.guidance_scale,
                   num_images_per_prompt=plan.samples, generator=generators(plan.seed, plan.samples),
                   face_mask=face_box_mask(photo.size, face.bbox) if plan.enhance_face_region else None,
                   callback_on_step_end=on_step_end)
    width, height = photo.size
    params = {
        "tool": TOOL, "model": plan.checkpoint_label, "prompt": plan.prompt, "negative_prompt": plan.negative_prompt,
        "steps": plan.steps, "guidance_scale": plan.guidance_scale, "scheduler": plan.scheduler,
        "ip_adapter_scale": plan.ip_adapter_scale, "identitynet_scale": IDENTITYNET_SCALE,
        "enhance_face_region": plan.enhance_face_region,
        "controlnets": [{"name": label, "scale": s} for _, _, s, _, label in plan.controlnets],
        "lora": {"name": plan.lora[3], "scale": plan.lora[2]} if plan.lora else None, "width": width, "height": height,
    }
    cns = ", ".join(f"{label}:{s:g}" for _, _, s, _, label in plan.controlnets) or "none"
    lora = f"{plan.lora[3]}:{plan.lora[2]:g}" if plan.lora else "none"
    return write_pngs(out.images, ctx.output_dir, plan.seed, lambda seed: (
        f"{plan.prompt}\nNegative prompt: {plan.negative_prompt}\nSteps: {plan.steps}, Sampler: {plan.scheduler}, "
        f"CFG scale: {plan.guidance_scale:g}, Seed: {seed}, Size: {width}x{height}, Model: {plan.checkpoint_label}, "
        f"IP-Adapter scale: {plan.ip_adapter_scale:g}, ControlNets: {cns}, LoRA: {lora}"), params)


class _Estimator:
    """A condition estimator held in the pipeline cache."""

    def __init__(self, fn):
        self.fn = fn
        model = getattr(fn, "model", None)
        self.components = {"model": model} if model is not None else {}
