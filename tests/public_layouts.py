"""Tiny replicas of the public checkpoints' on-disk layouts, built from config (random weights, no download).

- ``humannorm_like``: a full diffusers pipeline folder (``model_index.json`` + unet/ vae/ text_encoder/
  tokenizer/ scheduler/), the layout of ``xanderhuang/normal-adapted-sd1.5``.
- ``novae_like``: a base folder without vae/ plus a standalone VAE folder (``config.json`` +
  ``diffusion_pytorch_model.safetensors`` at the top), the layout of ``SG161222/Realistic_Vision_V4.0_noVAE`` +
  ``stabilityai/sd-vae-ft-mse``.
- ``faceid_state`` / ``faceid_plus_state``: ``ip-adapter-faceid_sd15.bin`` / ``ip-adapter-faceid-plus(v2)_sd15.bin``
  state dicts with the published key names and the shapes they have for a given UNet (512-D ArcFace input,
  4 tokens, rank-128 LoRA on every attention layer; Plus: the perceiver resampler over CLIP ViT-H features).
- ``hf_cache``: a Hugging Face hub cache holding a folder under a hub id (``models--org--name``), as
  ``huggingface-cli download`` leaves it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from idto3d.priors.tiny import make_tiny_base_model

ARCFACE_DIM = 512
FACEID_TOKENS = 4
FACEID_LORA_RANK = 128


def humannorm_like(folder: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    make_tiny_base_model(folder, seed=seed)
    if prediction_type != "epsilon":
        cfg_path = folder / "scheduler" / "scheduler_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["prediction_type"] = prediction_type
        cfg_path.write_text(json.dumps(cfg))
    return folder


def novae_like(base: Path, vae: Path, seed: int = 1) -> tuple[Path, Path]:
    make_tiny_base_model(base, seed=seed)
    vae.mkdir(parents=True)
    for f in (base / "vae").iterdir():
        shutil.move(str(f), vae / f.name)
    (base / "vae").rmdir()
    index = json.loads((base / "model_index.json").read_text())
    index.pop("vae")
    (base / "model_index.json").write_text(json.dumps(index))
    return base, vae


def _attention_layers(unet: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    return [(i, unet.get_submodule(name.removesuffix(".processor"))) for i, name in enumerate(unet.attn_processors)]


def faceid_state(unet: torch.nn.Module, seed: int = 0, lora: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """``ip-adapter-faceid_sd15``: MLPProjModel (512 -> 1024 -> 4 x cross, LayerNorm) + per-layer ``N.to_k_ip`` /
    ``N.to_v_ip`` on the cross-attention layers (odd N) + ``N.to_{q,k,v,out}_lora.{down,up}`` on all layers."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    c = unet.config.cross_attention_dim
    image_proj = {"proj.0.weight": rnd(2 * ARCFACE_DIM, ARCFACE_DIM), "proj.0.bias": rnd(2 * ARCFACE_DIM),
                  "proj.2.weight": rnd(FACEID_TOKENS * c, 2 * ARCFACE_DIM), "proj.2.bias": rnd(FACEID_TOKENS * c),
                  "norm.weight": 1 + rnd(c), "norm.bias": rnd(c)}
    ip: dict[str, torch.Tensor] = {}
    r = FACEID_LORA_RANK
    for i, attn in _attention_layers(unet):
        h, k_in = attn.to_q.out_features, attn.to_k.in_features
        if lora:
            for name, (n_in, n_out) in {"to_q_lora": (h, h), "to_k_lora": (k_in, h), "to_v_lora": (k_in, h),
                                        "to_out_lora": (h, h)}.items():
                ip[f"{i}.{name}.down.weight"] = rnd(r, n_in)
                ip[f"{i}.{name}.up.weight"] = rnd(n_out, r) * 0.1
        if attn.is_cross_attention:
            ip[f"{i}.to_k_ip.weight"] = rnd(h, k_in)
            ip[f"{i}.to_v_ip.weight"] = rnd(h, k_in)
    return {"image_proj": image_proj, "ip_adapter": ip}


def faceid_plus_state(unet: torch.nn.Module, seed: int = 0, clip_dim: int = 64, depth: int = 4
                      ) -> dict[str, dict[str, torch.Tensor]]:
    """``ip-adapter-faceid-plus(v2)_sd15``: ``proj``/``norm`` (the ID MLP, ffproj ratio 2) + the
    ``perceiver_resampler`` (FacePerceiverResampler: proj_in from CLIP features, ``depth`` blocks of
    [norm1, norm2, to_q, to_kv, to_out] attention and [LayerNorm, Linear, GELU, Linear] feed-forward, proj_out,
    norm_out) + the same per-layer ID K/V and LoRA as FaceID. ``clip_dim`` stands for CLIP ViT-H's 1280."""
    state = faceid_state(unet, seed)
    g = torch.Generator().manual_seed(seed + 1)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    c = unet.config.cross_attention_dim
    e, inner, ff = c, 64, 4 * c  # embed dims = cross dim (768 in SD1.5); dim_head 64, heads 1 here (12 there)
    pr = {"perceiver_resampler.proj_in.weight": rnd(e, clip_dim), "perceiver_resampler.proj_in.bias": rnd(e),
          "perceiver_resampler.proj_out.weight": rnd(c, e), "perceiver_resampler.proj_out.bias": rnd(c),
          "perceiver_resampler.norm_out.weight": 1 + rnd(c), "perceiver_resampler.norm_out.bias": rnd(c)}
    for layer in range(depth):
        p = f"perceiver_resampler.layers.{layer}"
        pr.update({f"{p}.0.norm1.weight": 1 + rnd(e), f"{p}.0.norm1.bias": rnd(e),
                   f"{p}.0.norm2.weight": 1 + rnd(e), f"{p}.0.norm2.bias": rnd(e),
                   f"{p}.0.to_q.weight": rnd(inner, e), f"{p}.0.to_kv.weight": rnd(2 * inner, e),
                   f"{p}.0.to_out.weight": rnd(e, inner),
                   f"{p}.1.0.weight": 1 + rnd(e), f"{p}.1.0.bias": rnd(e),
                   f"{p}.1.1.weight": rnd(ff, e), f"{p}.1.3.weight": rnd(e, ff)})
    proj = {"proj.0.weight": rnd(2 * ARCFACE_DIM, ARCFACE_DIM), "proj.0.bias": rnd(2 * ARCFACE_DIM),
            "proj.2.weight": rnd(FACEID_TOKENS * e, 2 * ARCFACE_DIM), "proj.2.bias": rnd(FACEID_TOKENS * e),
            "norm.weight": 1 + rnd(e), "norm.bias": rnd(e)}
    return {"image_proj": {**proj, **pr}, "ip_adapter": state["ip_adapter"]}


def hf_cache(cache: Path, repo_id: str, folder: Path, commit: str = "0" * 40) -> Path:
    """Put ``folder`` in a hub cache under ``repo_id`` (refs/main -> snapshots/<commit>/...)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    return cache


def clip_image_encoder_like(folder: Path, width: int = 64, seed: int = 0) -> Path:
    """``h94/IP-Adapter``'s ``models/image_encoder`` (a ``CLIPVisionModelWithProjection`` folder: config.json +
    weights, no preprocessor config) at ``width`` (ViT-H-14: 1280) instead of 1280, 224 px input, 32 px patches."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
                              num_attention_heads=4, image_size=224, patch_size=32, projection_dim=32)
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    return folder
