"""``idto3d bench guidance``: milliseconds per SDS step (forward + backward to the renders) on this machine.

Rows: the tiny SD1.5-architecture prior (VAE latents of a 64x64 render: the baseline), the tiny prior with
downsampled-normal latents, and a full-size SD1.5 UNet (random weights from its config, with our adapters)
at 64x64 latents, classifier-free guidance (batch 2) as in a run; and the tiny prior with the two branch-only
guidance terms on (batch 4: the cost of ``id_guidance_scale`` / ``exp_guidance_scale``). The full-size UNet's
text, ID and expression inputs are random tensors of the real sizes, and its latents are the Fantasia3D-style
downsampled renders: the SD1.5 VAE alone would add ~20 s per step on this CPU (DESIGN.md), and no
weights are downloaded. ``quick`` skips the full-size row (tens of seconds per step on 2 CPU cores).
"""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path

import torch

from idto3d.bench.timing import time_ms as _time_ms
from idto3d.core.config import GuidanceConfig
from idto3d.priors.guidance import GuidanceCond, SDSGuidance
from idto3d.priors.prior import Prior, PriorSpec, build_prior
from idto3d.priors.tiny import make_tiny_base_model, sd15_unet_config

_PROMPT = "A front view normal map face portrait of a young woman on a white background"


def _step_fn(guidance: SDSGuidance, images: torch.Tensor, cond: GuidanceCond):
    counter = iter(range(10**9))

    def step() -> None:
        images.grad = None
        guidance(images, cond, next(counter)).loss.backward()

    return step


def _full_size_prior(tiny: Prior) -> Prior:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**sd15_unet_config())  # ~860M random weights, a few seconds to build
    spec = PriorSpec(base_model="sd15-from-config", domain="normal", id_dim=512, exp_dim=768)
    return Prior(spec, unet, tiny.vae, tiny.text_encoder, tiny.tokenizer, tiny.noise_scheduler)


def bench_guidance(repeats: int = 5, quick: bool = False) -> list[dict]:
    torch.manual_seed(0)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="idto3d-bench-") as tmp:
        tiny = build_prior(make_tiny_base_model(Path(tmp) / "tiny"), "normal", 512)
        cond = GuidanceCond(prompts=[_PROMPT], id_embedding=torch.nn.functional.normalize(torch.randn(512), dim=0),
                            expressions=["smile"])
        cases = [("tiny SD1.5 (1M UNet), vae latents 8x8 of a 64x64 render",
                  GuidanceConfig(latent_mode="vae", latent_size=8), 64),
                 ("tiny SD1.5 (1M UNet), downsampled latents 64x64",
                  GuidanceConfig(latent_mode="downsample", latent_size=64), 256),
                 ("tiny, vae latents 8x8, + ID and expression guidance terms (batch 4)",
                  GuidanceConfig(latent_mode="vae", latent_size=8, id_guidance_scale=1.0, exp_guidance_scale=1.0),
                  64)]
        base_ms = None
        for case, cfg, res in cases:
            images = torch.rand(1, 3, res, res, requires_grad=True)
            ms = _time_ms(_step_fn(SDSGuidance(tiny, cfg, "geometry", 1000), images, cond), repeats,
                          torch.device("cpu"))
            base_ms = base_ms or ms
            rows.append({"stage": "guidance", "case": case, "backend": "torch cpu", "ms": ms,
                         "baseline": "tiny vae", "ratio": ms / base_ms})
        if not quick:
            full = _full_size_prior(tiny)
            n = full.parameter_breakdown()["base_unet"] / 1e6
            full_cond = GuidanceCond(text_embeddings=torch.randn(1, 77, 768),
                                     negative_text_embeddings=torch.randn(1, 77, 768),
                                     id_embedding=cond.id_embedding, expression_embeddings=torch.randn(1, 768))
            images = torch.rand(1, 3, 512, 512, requires_grad=True)
            cfg = GuidanceConfig(latent_mode="downsample", latent_size=64)
            step = _step_fn(SDSGuidance(full, cfg, "geometry", 1000), images, full_cond)
            # One timed repeat after the warm-up: each costs tens of seconds on a laptop-class CPU.
            ms = _time_ms(step, 1, torch.device("cpu"))
            rows.append({"stage": "guidance", "case": f"full-size SD1.5 UNet ({n:.0f}M + adapters), "
                                                      f"downsampled latents 64x64", "backend": "torch cpu",
                         "ms": ms, "baseline": "tiny vae", "ratio": ms / base_ms})
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine()}
    for r in rows:
        r.update(meta)
    return rows
