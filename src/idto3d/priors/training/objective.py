"""The denoising objective L_simple (paper eq. 5) and the seeded micro-batch stream it is trained on.

Every random draw (data order, noise, timesteps, condition dropout) comes from a CPU generator seeded
by ``generator_for(seed, ...)``, so micro-batch ``m`` of process ``r`` is a pure function of
``(seed, m, r)`` and identical on every device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from idto3d.priors.training.train_state import TrainError


def _seed_for(*parts: Any) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator_for(*parts: Any) -> torch.Generator:
    """A CPU generator seeded by a hash of ``parts`` (e.g. ``(seed, "noise", m, rank)``)."""
    return torch.Generator().manual_seed(_seed_for(*parts))


class StepBatches:
    """Index lists for micro-batches ``start, start + 1, ...`` of one process, forever.

    The global sample stream is one seeded permutation of the data set per epoch, concatenated;
    micro-batch ``m`` takes ``batch_size * world`` consecutive samples of it and process ``rank`` its
    ``rank``-th share. Resuming at micro-batch ``m`` needs nothing but ``m``.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, world: int = 1, rank: int = 0):
        self.n, self.batch_size, self.seed, self.start, self.world, self.rank = n, batch_size, seed, start, world, rank
        self._perm: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(self.n, generator=generator_for(self.seed, "epoch", epoch)))
        return self._perm[1]

    def batch(self, m: int) -> list[int]:
        first = (m * self.world + self.rank) * self.batch_size
        return [int(self._permutation(p // self.n)[p % self.n]) for p in range(first, first + self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        m = self.start
        while True:
            yield self.batch(m)
            m += 1


# --- the objective ---------------------------------------------------------------------------------


@dataclass
class DenoisingInputs:
    """One micro-batch ready for the UNet: noisy latents, their targets and the (dropped) conditions."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    text: torch.Tensor
    id_embedding: torch.Tensor
    exp_embedding: torch.Tensor
    keep_id: torch.Tensor  # [B] float, 0 where the ID condition is dropped (or absent)
    keep_exp: torch.Tensor  # [B] float


def drop_masks(batch_size: int, p: float, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Per-sample (drop_text, drop_id, drop_exp): all three with probability p, each alone with probability p."""
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    drop_all = u < p
    drop_text = drop_all | ((u >= p) & (u < 2 * p))
    drop_id = drop_all | ((u >= 2 * p) & (u < 3 * p))
    drop_exp = drop_all | ((u >= 3 * p) & (u < 4 * p))
    return drop_text, drop_id, drop_exp


def training_latents(prior: Any, images: torch.Tensor) -> torch.Tensor:
    """The latents a prior trains on: its VAE's, or (``spec.latents`` mode ``downsample``) the images + their
    mask resized to ``spec.latents["size"]``, the same 4 channels SDS's downsample mode makes from renders."""
    latents = getattr(prior.spec, "latents", None)
    if not latents or latents.get("mode") != "downsample":
        return prior.encode_images(images)
    from idto3d.priors.guidance import background_mask, downsample_latents

    mask = background_mask(images, prior.conventions.background)
    return downsample_latents(torch.cat([images, mask], dim=1), int(latents["size"]))


@torch.no_grad()
def prepare_inputs(prior: Any, batch: dict, generator: torch.Generator, condition_dropout: float = 0.0
                   ) -> DenoisingInputs:
    """Encode images and conditions, draw noise and timesteps from ``generator`` (on the CPU, so every
    device draws the same numbers) and noise the latents."""
    device = next(prior.unet.parameters()).device
    images = batch["image"].to(device)
    B = images.shape[0]
    latents = training_latents(prior, images)
    sched = prior.noise_scheduler
    T = int(sched.config.num_train_timesteps)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(device, latents.dtype)
    timesteps = torch.randint(0, T, (B,), generator=generator).to(device)
    drop_text, drop_id, drop_exp = drop_masks(B, condition_dropout, generator)
    prompts = ["" if d else p for p, d in zip(batch["prompt"], drop_text.tolist())]
    text = prior.encode_text(prompts)
    exp = prior.encode_expressions(list(batch["expression"]))
    keep_id = (batch["has_id"].to(torch.bool) & ~drop_id).to(device, torch.float32)
    keep_exp = (~drop_exp).to(device, torch.float32)
    noisy = sched.add_noise(latents, noise, timesteps)
    kind = sched.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = sched.get_velocity(latents, noise, timesteps)
    else:
        raise TrainError(f"the base model's scheduler predicts {kind!r}; only epsilon and v_prediction train")
    return DenoisingInputs(noisy, timesteps, target, text, batch["id_embedding"].to(device, torch.float32),
                           exp, keep_id, keep_exp)


class DenoisingObjective(nn.Module):
    """What ``accelerator.prepare`` wraps: its ``forward`` is the UNet's noise prediction with per-sample
    condition switches (a dropped ID/expression gets lambda 0, which removes that branch exactly)."""

    def __init__(self, prior: nn.Module):
        super().__init__()
        self.prior = prior

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor, id_embedding: torch.Tensor,
                exp_embedding: torch.Tensor, keep_id: torch.Tensor, keep_exp: torch.Tensor) -> torch.Tensor:
        return self.prior.predict_noise(noisy, timesteps, text, id_embedding=id_embedding,
                                        exp_embedding=exp_embedding, lambda_id=keep_id, lambda_exp=keep_exp)


def denoising_loss(model: nn.Module, inputs: DenoisingInputs) -> torch.Tensor:
    """L_simple: mean squared error between the predicted and the true noise (or velocity)."""
    pred = model(inputs.noisy, inputs.timesteps, inputs.text, inputs.id_embedding, inputs.exp_embedding,
                 inputs.keep_id, inputs.keep_exp)
    return torch.nn.functional.mse_loss(pred.float(), inputs.target.float())


__all__ = ["DenoisingInputs", "DenoisingObjective", "StepBatches", "denoising_loss", "drop_masks",
           "generator_for", "prepare_inputs", "training_latents"]
