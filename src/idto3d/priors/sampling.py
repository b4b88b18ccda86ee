"""DDIM samples from a prior (paper figures 15-16): what a trained prior has learnt, image by image.

Each sample starts from seeded Gaussian latents and runs diffusers' ``DDIMScheduler`` (built from the prior's
own noise schedule) with the same classifier-free guidance as SDS (``guidance.SDSGuidance.predict_noise``: one
code path for the conditional/unconditional halves, the ID and expression branches), then the prior's VAE decodes
the latents (a prior trained on downsampled renders: the latents' RGB channels are the image). Works for any
prior folder ``load_prior`` reads: a miniature one trained here or a full-size one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from idto3d.core.config import GuidanceConfig


@dataclass(frozen=True)
class SampleSpec:
    """One image to sample: its prompt, identity embedding (or None) and expression name."""

    prompt: str
    id_embedding: torch.Tensor | None
    expression: str | None


def ddim_samples(prior, specs: Sequence[SampleSpec], *, steps: int = 25, guidance_scale: float = 3.0,
                 lambda_id: float = 1.0, id_guidance_scale: float = 0.0, exp_guidance_scale: float = 0.0,
                 seed: int = 0, eta: float = 0.0) -> torch.Tensor:
    """``[N, H, W, 3]`` images in [0, 1], one per spec; sample ``i`` is a function of ``(seed, i)`` only."""
    from diffusers import DDIMScheduler

    from idto3d.priors.guidance import GuidanceCond, SDSGuidance

    cfg = GuidanceConfig(guidance_scale=guidance_scale, lambda_id=lambda_id, id_guidance_scale=id_guidance_scale,
                         exp_guidance_scale=exp_guidance_scale)
    guide = SDSGuidance(prior, cfg)
    downsampled = guide.config.latent_mode == "downsample"  # the prior records it: latents are the image
    size = guide.config.latent_size if downsampled else prior.resolution // prior.vae_scale_factor
    channels = int(prior.unet.config.in_channels)
    out = []
    for i, spec in enumerate(specs):
        sched = DDIMScheduler.from_config(prior.noise_scheduler.config)
        sched.set_timesteps(steps)
        gen = torch.Generator().manual_seed(seed * 100003 + i)
        z = torch.randn(1, channels, size, size, generator=gen).to(prior.device) * sched.init_noise_sigma
        cond = GuidanceCond(prompts=[spec.prompt], id_embedding=spec.id_embedding,
                            expressions=None if spec.expression is None else [spec.expression])
        with torch.no_grad():
            for t in sched.timesteps:
                eps = guide.predict_noise(z, int(t), cond)
                z = sched.step(eps, t, z, eta=eta, generator=gen).prev_sample
            if downsampled:
                image = z[:, :3]  # the RGB channels of a downsampled render, in [-1, 1]
            else:
                with prior.autocast():
                    image = prior.vae.decode(z.to(prior.dtype) / prior.vae.config.scaling_factor).sample
        out.append(((image.float() + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0).cpu())
    return torch.stack(out)


def image_grid(images: torch.Tensor, columns: int) -> np.ndarray:
    """``[N, H, W, 3]`` in [0, 1] -> one uint8 grid, ``columns`` wide, row-major, white gaps."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    grid = np.full((rows * (h + 2), columns * (w + 2), 3), 255, np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, columns)
        grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = (im.numpy() * 255 + 0.5).astype(np.uint8)
    return grid


__all__ = ["SampleSpec", "ddim_samples", "image_grid"]
