"""Tiny random-weight SDXL, SDXL ControlNets, SDXL LoRAs and an InstantID IP-Adapter, in the
exact on-disk formats the real weights use (see ``easel.synthetic.tiny`` for the SD 1.5 / FLUX ones).

What is written (by ``easel.synthetic.tiny.make_tiny``):

- ``sdxl/``: a diffusers ``StableDiffusionXLPipeline`` folder, the layout of
  ``stabilityai/stable-diffusion-xl-base-1.0``: ``unet/`` (``addition_embed_type="text_time"``,
  three levels, ``DownBlock2D`` + two ``CrossAttnDownBlock2D``, linear projections, two
  transformer layers at the lowest level), ``text_encoder/`` (``CLIPTextModel``, 32-d),
  ``text_encoder_2/`` (``CLIPTextModelWithProjection``, 64-d, projection 64), ``tokenizer/`` and
  ``tokenizer_2/`` (byte-level BPE vocabularies built offline; ``tokenizer_2`` pads with ``!`` as
  SDXL's does), ``vae/`` (scale factor 8, ``scaling_factor`` 0.13025), ``scheduler/``.
  Cross-attention width 96 = 32 + 64, the concatenation of both encoders' hidden states, as 2048 =
  768 + 1280 in SDXL. The two encoders have different widths on purpose: diffusers' single-file
  loader tells CLIP-L from OpenCLIP-G by the width of the position embedding.
- ``sdxl-single-file.safetensors``: the same weights in the original SGM layout of community SDXL
  checkpoints: ``model.diffusion_model.*`` (UNet, ``label_emb.0.*`` for the added-conditions MLP),
  ``first_stage_model.*`` (VAE), ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L in
  transformers naming) and ``conditioner.embedders.1.model.*`` (OpenCLIP-G naming: fused
  ``attn.in_proj_weight``, ``ln_final``, transposed ``text_projection``). Loaded with
  ``StableDiffusionXLPipeline.from_single_file(path, config=<sdxl folder>)``.
- ``sdxl-controlnet-{identitynet,openpose,depth,canny}/``: ``ControlNetModel`` folders
  (``config.json`` + ``diffusion_pytorch_model.safetensors``) built with
  ``ControlNetModel.from_unet`` from the tiny UNet, as every SDXL ControlNet is initialised from
  the SDXL UNet. Their zero-initialised output convolutions are given random weights (a trained
  ControlNet's are not zero), each with its own seed, so each ControlNet changes the image.
- ``sdxl-lora-kohya.safetensors`` (sd-scripts' SDXL naming over the original SGM module names,
  ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight`` + ``.alpha``,
  the layout of most community SDXL LoRAs) and ``sdxl-lora-peft.safetensors``
  (``unet.<diffusers module>.lora_A.weight``, as ``save_lora_weights`` writes).
- ``instantid-ip-adapter.bin``: a torch pickle of ``{"image_proj": {...}, "ip_adapter": {...}}``,
  the format of ``InstantX/InstantID``'s ``ip-adapter.bin`` (a perceiver ``Resampler`` from the
  512-d face embedding to 16 tokens, and ``to_k_ip`` / ``to_v_ip`` per cross-attention layer,
  numbered by the position of the layer's processor in ``unet.attn_processors``), and
  ``instantid-ip-adapter.safetensors``, the same tensors flattened with ``image_proj.`` /
  ``ip_adapter.`` prefixes.
  The openpose one is saved as ``thibaud/controlnet-openpose-sdxl-1.0`` ships it: ``config.json``
  + ``OpenPoseXL2.safetensors`` (diffusers keys in a single file, no
  ``diffusion_pytorch_model.safetensors``), read by :func:`easel.pipelines.instantid.load_controlnet`.
- ``depth-dpt/``: a tiny transformers ``DPTForDepthEstimation`` + image processor (stand-in for
  ``Intel/dpt-hybrid-midas``).
- ``pose-openpose/``: ``body_pose_model.pth`` as ``lllyasviel/Annotators`` ships it, the real
  OpenPose body network's keys and shapes with small expanded random weights
  (:func:`easel.synthetic.tiny_openpose.write_tiny_openpose`).
- ``faces/models/antelopev2/``: the tiny ONNX face pack (``easel.synthetic.tiny_faces``); pass
  ``faces`` as insightface's ``root``.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from easel.synthetic.ldm_layout import open_clip_to_ldm, text_encoder_to_ldm, unet_to_ldm, vae_to_ldm
from easel.synthetic.tiny_faces import write_face_pack
from easel.synthetic.tiny_loras import random_unet_lora, write_lora_peft
from easel.synthetic.tiny_openpose import write_tiny_openpose
from easel.synthetic.tokenizers import write_clip_tokenizer

_SEED = 100
CONTROLNETS = ("identitynet", "openpose", "depth", "canny")
# the weight file of each tiny ControlNet folder: the real repo's name (diffusers' default otherwise)
CONTROLNET_WEIGHTS = {"openpose": "OpenPoseXL2.safetensors"}
TE1_WIDTH, TE2_WIDTH = 32, 64


def build_sdxl_pipeline():
    """Build the tiny SDXL pipeline in memory (fixed seed). Returns a ``StableDiffusionXLPipeline``."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(_SEED)
    with tempfile.TemporaryDirectory() as tmp:
        tok = write_clip_tokenizer(Path(tmp) / "a")
        write_clip_tokenizer(Path(tmp) / "b")
        tok2 = CLIPTokenizer.from_pretrained(str(Path(tmp) / "b"), pad_token="!")
    bos, eos = tok.convert_tokens_to_ids("<|startoftext|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    common = dict(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                  hidden_act="quick_gelu")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=TE1_WIDTH, intermediate_size=64, num_hidden_layers=3, num_attention_heads=1,
        projection_dim=TE1_WIDTH, pad_token_id=eos, **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=TE2_WIDTH, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
        projection_dim=TE2_WIDTH, pad_token_id=tok2.pad_token_id, **{**common, "hidden_act": "gelu"}))
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(1, 1, 1),  # legacy name: heads
        use_linear_projection=True, norm_num_groups=32, cross_attention_dim=TE1_WIDTH + TE2_WIDTH,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=TE2_WIDTH + 6 * time_dim,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=1,
        block_out_channels=(8, 16, 32, 32), norm_num_groups=8, scaling_factor=0.13025,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon",
    )
    # keys of SDXL base's scheduler_config.json that other schedulers read through from_config
    # (PNDM's PLMS-only mode, DDIM's final alpha, no sample clipping)
    scheduler.register_to_config(skip_prk_steps=True, set_alpha_to_one=False, clip_sample=False, sample_max_value=1.0)
    for module in (text_encoder, text_encoder_2, unet, vae):
        module.eval()
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tok, tokenizer_2=tok2,
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )




def write_sdxl_single_file(pipe, path: Path) -> None:
    """Save ``pipe``'s UNet, VAE and both text encoders as one SGM-layout ``.safetensors``."""
    from safetensors.torch import save_file

    sd = {}
    sd.update(unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config)))
    sd.update(vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)))
    te1 = text_encoder_to_ldm(pipe.text_encoder.state_dict())
    sd.update({k.replace("cond_stage_model.", "conditioner.embedders.0.", 1): v for k, v in te1.items()})
    sd.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def build_controlnet(unet, seed: int):
    """A ``ControlNetModel`` initialised from ``unet`` (as SDXL ControlNets are), with random
    (not zero) output convolutions so that it visibly conditions the image."""
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 16, 32, 32))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net.eval()


def write_sdxl_lora_kohya(pipe, path: Path, seed: int = 21, alpha: float = 4.0) -> None:
    """Write an SDXL LoRA as sd-scripts saves it: SGM module names
    (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight``), ``.alpha``."""
    import torch
    from safetensors.torch import save_file

    lora = random_unet_lora(pipe, seed)
    config = dict(pipe.unet.config)
    names = {}
    for module in {k.rsplit(".lora_", 1)[0] for k in lora}:
        (ldm_key,) = unet_to_ldm({module + ".weight": None}, config)
        names[module] = "lora_unet_" + ldm_key.removeprefix("model.diffusion_model.").removesuffix(".weight").replace(".", "_")
    sd = {}
    for key, value in lora.items():
        module, _, kind = key.rpartition(".lora_")
        base = names[module]
        sd[f"{base}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        sd[f"{base}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path), metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"})


def write_sdxl_lora_peft(pipe, path: Path, seed: int = 22) -> None:
    """Write an SDXL LoRA in the diffusers/PEFT layout (``unet.<module>.lora_A.weight``)."""
    write_lora_peft(pipe, path, seed=seed)


def build_ip_adapter_state_dict(unet, seed: int = 31, dim: int = 64, depth: int = 2, num_tokens: int = 16,
                                embedding_dim: int = 512) -> dict:
    """An InstantID ``ip-adapter.bin``-shaped state dict for ``unet``:
    ``{"image_proj": Resampler weights, "ip_adapter": {"<i>.to_k_ip.weight", "<i>.to_v_ip.weight"}}``.

    The resampler has ``dim`` channels (heads of 64, as :func:`easel.pipelines.instantid.resampler_from_state_dict`
    infers), ``depth`` layers and ``num_tokens`` queries and maps ``embedding_dim`` to the UNet's
    cross-attention width. Weights are random with a fixed seed.
    """
    import torch

    from easel.pipelines.instantid import Resampler, ip_layer_shapes

    torch.manual_seed(seed)
    cross = unet.config.cross_attention_dim
    proj = Resampler(dim=dim, depth=depth, dim_head=64, heads=max(1, dim // 64), num_queries=num_tokens,
                     embedding_dim=embedding_dim, output_dim=cross, ff_mult=4)
    g = torch.Generator().manual_seed(seed + 1)
    ip = {}
    for index, (hidden, cross_dim) in ip_layer_shapes(unet).items():
        ip[f"{index}.to_k_ip.weight"] = torch.randn(hidden, cross_dim, generator=g) / cross_dim ** 0.5
        ip[f"{index}.to_v_ip.weight"] = torch.randn(hidden, cross_dim, generator=g) / cross_dim ** 0.5
    return {"image_proj": proj.state_dict(), "ip_adapter": ip}


def write_ip_adapter(unet, bin_path: Path, safetensors_path: Path) -> None:
    """Write the tiny InstantID IP-Adapter as a torch pickle (the released format) and as safetensors."""
    import torch
    from safetensors.torch import save_file

    sd = build_ip_adapter_state_dict(unet)
    torch.save(sd, str(bin_path))
    flat = {f"{group}.{k}": v.contiguous() for group, part in sd.items() for k, v in part.items()}
    save_file(flat, str(safetensors_path))


def write_all(folder: Path) -> dict[str, Path]:
    """Write every SDXL-family tiny model into ``folder``; return :func:`paths`."""
    out = paths(folder)
    pipe = build_sdxl_pipeline()
    pipe.save_pretrained(str(out["sdxl"]), safe_serialization=True)
    write_sdxl_single_file(pipe, out["sdxl-single-file"])
    write_sdxl_lora_kohya(pipe, out["sdxl-lora-kohya"])
    write_sdxl_lora_peft(pipe, out["sdxl-lora-peft"])
    for i, name in enumerate(CONTROLNETS):
        folder_cn = out[f"sdxl-controlnet-{name}"]
        build_controlnet(pipe.unet, _SEED + 10 + i).save_pretrained(str(folder_cn), safe_serialization=True)
        if name in CONTROLNET_WEIGHTS:
            (folder_cn / "diffusion_pytorch_model.safetensors").rename(folder_cn / CONTROLNET_WEIGHTS[name])
    write_ip_adapter(pipe.unet, out["instantid-ip-adapter"], out["instantid-ip-adapter-safetensors"])
    write_tiny_dpt(out["depth-dpt"])
    write_tiny_openpose(out["pose-openpose"])
    write_face_pack(out["faces"])
    return out


def paths(folder: Path) -> dict[str, Path]:
    """Name → path of every SDXL-family tiny model under ``folder``."""
    return {
        "sdxl": folder / "sdxl",
        "sdxl-single-file": folder / "sdxl-single-file.safetensors",
        "sdxl-lora-kohya": folder / "sdxl-lora-kohya.safetensors",
        "sdxl-lora-peft": folder / "sdxl-lora-peft.safetensors",
        "instantid-ip-adapter": folder / "instantid-ip-adapter.bin",
        "instantid-ip-adapter-safetensors": folder / "instantid-ip-adapter.safetensors",
        **{f"sdxl-controlnet-{name}": folder / f"sdxl-controlnet-{name}" for name in CONTROLNETS},
        "depth-dpt": folder / "depth-dpt",
        "pose-openpose": folder / "pose-openpose",
        "faces": folder / "faces",
    }


def write_tiny_dpt(folder: Path, seed: int = 41) -> Path:
    """A tiny ``DPTForDepthEstimation`` (ViT backbone, 4 layers of 32) with its image processor
    (64×64 input), saved as ``from_pretrained`` reads ``Intel/dpt-hybrid-midas``. Random weights:
    its "depth" is noise, but the transformers loading and inference path is the real one."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(seed)
    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=1, intermediate_size=64, image_size=64,
                       patch_size=16, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
                       fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5], head_in_index=-1)
    DPTForDepthEstimation(config).eval().save_pretrained(str(folder), safe_serialization=True)
    DPTImageProcessor(size={"height": 64, "width": 64}, keep_aspect_ratio=False, ensure_multiple_of=32,
                      do_rescale=True, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(str(folder))
    return folder
