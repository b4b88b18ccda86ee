"""Score distillation sampling (paper eq. 6): ``guidance(images, cond, step) -> SDSOutput(loss, grad_norm, t)``.

One step: renders -> latents z (VAE posterior mean, or Fantasia3D's downsampled normals + mask), a timestep
t from the stage's ``TimestepSchedule``, z_t = sqrt(abar) z + sqrt(1 - abar) eps, a noise prediction eps_hat
(the prior with classifier-free guidance, or ``OracleGuidance``'s exact score of a known target), and
g = w(t) (eps_hat - eps). The returned loss is ``0.5 * ||z - (z - g).detach()||^2 / B``, so its gradient
w.r.t. z is ``g / B`` (the SDS gradient, averaged over the batch) and autograd carries it to the renders.

A non-finite g (NaN/inf renders, or a prior that overflowed in fp16) follows ``GuidanceConfig.nan_policy``:
``raise`` (default) raises ``NonFiniteGradientError``, as silently dropping steps can hide a diverging run;
``skip`` warns and returns a zero loss detached from the renders, so the step changes nothing.
Both read the gradient back to the host, which on a GPU waits for the step to finish. With ``deferred_checks``
on (the SDS stages set it), nothing is read back: ``SDSOutput.finite`` is a device flag, a non-finite g stays in
the loss (so it reaches the parameters' gradients, where the stage's optimizer skips the step on the device), and
``grad_norm`` is a device tensor.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from idto3d.core.config import GuidanceConfig
from idto3d.core.errors import IdtoError
from idto3d.core.device import to_device


class NonFiniteGradientError(IdtoError):
    """The SDS gradient contains NaN or inf."""


@dataclass(frozen=True)
class TimestepSchedule:
    """Uniform t in ``start`` (on a 1000-step scale); after ``anneal_from`` of the run the range moves
    linearly toward ``end``, reaching it at the last step."""

    name: str
    start: tuple[int, int]
    end: tuple[int, int] | None = None
    anneal_from: float = 0.5

    def range_at(self, step: int, total_steps: int) -> tuple[int, int]:
        if self.end is None:
            return self.start
        progress = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
        if progress <= self.anneal_from:
            return self.start
        a = (progress - self.anneal_from) / (1.0 - self.anneal_from)
        lo = round(self.start[0] + a * (self.end[0] - self.start[0]))
        hi = round(self.start[1] + a * (self.end[1] - self.start[1]))
        return lo, hi

    def sample(self, step: int, total_steps: int, generator: torch.Generator | None = None,
               num_train_timesteps: int = 1000) -> int:
        lo, hi = self.range_at(step, total_steps)
        scale = num_train_timesteps / 1000.0
        lo, hi = round(lo * scale), min(round(hi * scale), num_train_timesteps - 1)
        return int(torch.randint(lo, hi + 1, (1,), generator=generator).item())


# Paper section B: geometry [200, 700] for the first half, then annealed toward [50, 200]; texture diffuse
# [50, 900], roughness/metallic [50, 500], the photoreal refinement [50, 100].
SCHEDULES: dict[str, TimestepSchedule] = {
    "geometry": TimestepSchedule("geometry", (200, 700), (50, 200), anneal_from=0.5),
    "texture_diffuse": TimestepSchedule("texture_diffuse", (50, 900)),
    "texture_pbr": TimestepSchedule("texture_pbr", (50, 500)),
    "refine": TimestepSchedule("refine", (50, 100)),
}


def get_schedule(name: str) -> TimestepSchedule:
    if name not in SCHEDULES:
        raise IdtoError(f"unknown timestep schedule '{name}'; known: {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


@dataclass
class GuidanceCond:
    """What a render is conditioned on. Sequences hold one entry per image, or one for all."""

    prompts: Sequence[str] | None = None
    text_embeddings: torch.Tensor | None = None       # [B|1, 77, C], instead of prompts
    negative_prompt: str = ""
    negative_text_embeddings: torch.Tensor | None = None  # [1|B, 77, C], instead of negative_prompt
    id_embedding: torch.Tensor | None = None          # [D] or [B, D]
    expressions: Sequence[str] | None = None          # expression names, or
    expression_embeddings: torch.Tensor | None = None  # [B|1, D_clip]
    # Where each render came from; a prior ignores these, a mesh oracle renders its targets from them.
    cameras: Any = None                               # render.camera.Camera with B views
    expression_indices: Sequence[int] | None = None   # the run's expression index per image
    lighting: Any = None                              # render.envmap.EnvironmentMap the renders were lit by
    shading: str | None = None                        # "diffuse" or "pbr": how the renders were shaded


@dataclass
class SDSOutput:
    loss: torch.Tensor          # scalar; backward() sends the SDS gradient to the renders
    grad_norm: float | torch.Tensor  # ||g|| over the batch's latents, after clipping (a tensor when deferred)
    t: int
    w: float = 0.0
    latents: torch.Tensor | None = None     # z, differentiable (call retain_grad() to read z.grad)
    noise: torch.Tensor | None = None       # eps
    noise_pred: torch.Tensor | None = None  # eps_hat
    finite: torch.Tensor | None = None      # with deferred checks: a device bool, whether g is finite


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    down = x.shape[-1] > size or x.shape[-2] > size
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=down)


BACKGROUND_TOLERANCE = 0.02  # a pixel this close to the background colour in every channel is background


def background_mask(images: torch.Tensor, background: tuple[float, float, float]) -> torch.Tensor:
    """``[B, 1, H, W]``: 1 where ``images`` ``[B, 3, H, W]`` differ from the flat background colour (the
    renders' coverage mask, which the training PNGs do not keep; a unit normal never encodes to a flat colour)."""
    bg = torch.tensor(background, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return ((images - bg).abs() > BACKGROUND_TOLERANCE).any(dim=1, keepdim=True).to(images.dtype)


def training_mask(images: torch.Tensor, background: tuple[float, float, float]) -> torch.Tensor:
    """``images`` [B, 4, H, W] (RGB + antialiased coverage) with the mask a downsample prior was trained on:
    the PNG's background rule, which marks a partly covered edge pixel 1 where the render's coverage is a
    fraction. Straight-through: that value forward, the coverage's gradient backward (the silhouette still moves).
    """
    cov = images[:, 3:4]
    hard = background_mask(images[:, :3].detach(), background)
    return torch.cat([images[:, :3], cov + (hard - cov).detach()], dim=1)


def downsample_latents(images: torch.Tensor, size: int) -> torch.Tensor:
    """Fantasia3D's trick: renders [B,3|4,H,W] in [0,1] (RGB normals + mask; a missing mask is all ones)
    resized to ``size`` and mapped to [-1, 1] serve as the 4 latent channels directly."""
    if images.shape[1] == 3:
        images = torch.cat([images, torch.ones_like(images[:, :1])], dim=1)
    if images.shape[1] != 4:
        raise ValueError(f"downsample latents need [B, 3|4, H, W] renders, got {tuple(images.shape)}")
    return _resize(images, size) * 2.0 - 1.0


def prior_latents(prior: Any, config: GuidanceConfig) -> GuidanceConfig:
    """``config`` with the latent space ``prior`` was trained on, when its folder records one (``spec.latents``):
    a prior trained on downsampled renders guides in them at its size, whatever the preset says."""
    latents = getattr(getattr(prior, "spec", None), "latents", None)
    if not latents:
        return config
    return dataclasses.replace(config, latent_mode=str(latents["mode"]), latent_size=int(latents["size"]))


def _sd15_alphas_cumprod() -> torch.Tensor:
    from diffusers import DDPMScheduler

    from idto3d.priors.tiny import sd15_scheduler_config

    return DDPMScheduler(**sd15_scheduler_config()).alphas_cumprod


class ScoreDistillation:
    """The SDS step shared by the prior and the oracle; subclasses supply ``predict_noise``."""

    def __init__(self, config: GuidanceConfig | None, schedule: TimestepSchedule | str, total_steps: int,
                 alphas_cumprod: torch.Tensor, seed: int = 0) -> None:
        self.config = config or GuidanceConfig()
        self.schedule = get_schedule(schedule) if isinstance(schedule, str) else schedule
        if total_steps < 1:
            raise ValueError("total_steps must be >= 1")
        self.total_steps = total_steps
        self.alphas_cumprod = alphas_cumprod.detach().float().cpu()
        # Host generator: the same seed draws the same t and noise on every device.
        self.generator = torch.Generator().manual_seed(seed)
        self.deferred_checks = False
        # The prompts, negative prompt and normal-map background the renders and text should follow (the
        # prior's; None: the stage's legacy ones, see priors.conventions).
        self.conventions: Any = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The random state (t and noise draws), for checkpoints that resume bit-identically."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict_noise(self, z_t: torch.Tensor, t: int, cond: GuidanceCond) -> torch.Tensor:
        raise NotImplementedError

    def weight(self, t: int) -> float:
        return 1.0 - float(self.alphas_cumprod[t]) if self.config.weighting == "sds" else 1.0

    def __call__(self, images: torch.Tensor, cond: GuidanceCond | None, step: int) -> SDSOutput:
        cond = cond or GuidanceCond()
        z = self.encode(images)
        t = self.schedule.sample(step, self.total_steps, self.generator, len(self.alphas_cumprod))
        abar = float(self.alphas_cumprod[t])
        noise = to_device(torch.randn(z.shape, generator=self.generator), z.device).to(z.dtype)
        with torch.no_grad():
            z_t = math.sqrt(abar) * z.detach() + math.sqrt(1.0 - abar) * noise
            eps_hat = self.predict_noise(z_t, t, cond)
        w = self.weight(t)
        grad = w * (eps_hat.float() - noise.float())
        if self.deferred_checks:
            return self._deferred_output(z, grad, t, w, noise, eps_hat)
        if not bool(torch.isfinite(grad).all()):
            msg = (f"SDS gradient is not finite at step {step} (t={t}): the renders hold NaN/inf or the prior "
                   f"overflowed (fp16?); lower the learning rate, or set prior.guidance.nan_policy=skip")
            if self.config.nan_policy == "raise":
                raise NonFiniteGradientError(msg)
            warnings.warn(msg + "; skipping this step", RuntimeWarning, stacklevel=2)
            loss = torch.zeros((), device=z.device, requires_grad=True)
            return SDSOutput(loss, 0.0, t, w, z, noise, eps_hat)
        if self.config.grad_clip > 0:
            grad = grad.clamp(-self.config.grad_clip, self.config.grad_clip)
        target = (z.float() - grad).detach()
        loss = 0.5 * F.mse_loss(z.float(), target, reduction="sum") / z.shape[0]
        return SDSOutput(loss, float(grad.norm()), t, w, z, noise, eps_hat)

    def _deferred_output(self, z: torch.Tensor, grad: torch.Tensor, t: int, w: float, noise: torch.Tensor,
                         eps_hat: torch.Tensor) -> SDSOutput:
        finite = torch.isfinite(grad).all()
        if self.config.grad_clip > 0:
            grad = grad.clamp(-self.config.grad_clip, self.config.grad_clip)
        target = (z.float() - grad).detach()
        loss = 0.5 * F.mse_loss(z.float(), target, reduction="sum") / z.shape[0]
        return SDSOutput(loss, grad.detach().norm(), t, w, z, noise, eps_hat, finite)


class SDSGuidance(ScoreDistillation):
    """SDS with a ``Prior`` and classifier-free guidance (scale ``config.guidance_scale``, paper: 10).

    The unconditional half uses the negative prompt and no expression tokens; its ID branch is off, or (prior
    conventions ``uncond_id: zero``, as IP-Adapter FaceID) attends to the projected zero embedding. With
    ``config.id_guidance_scale`` (``exp_guidance_scale``) > 0 another part, the conditional one with its ID
    (expression) branch off, adds an ID-only (expression-only) guidance term (not in the paper). All parts run
    in one batched UNet call with per-sample branch weights.
    """

    def __init__(self, prior: Any, config: GuidanceConfig | None = None,
                 schedule: TimestepSchedule | str = "geometry", total_steps: int = 1000, seed: int = 0) -> None:
        super().__init__(prior_latents(prior, config or GuidanceConfig()), schedule, total_steps,
                         prior.noise_scheduler.alphas_cumprod, seed)
        self.prior = prior
        self.conventions = getattr(prior, "conventions", None)

    def _background(self) -> tuple[float, float, float]:
        return tuple(self.conventions.background) if self.conventions is not None else (1.0, 1.0, 1.0)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.latent_mode == "downsample":
            if cfg.downsample_mask == "training" and images.shape[1] == 4:
                images = training_mask(images, self._background())
            return downsample_latents(images, cfg.latent_size)  # fp32: the prior casts its input itself
        rgb = _resize(images[:, :3], cfg.latent_size * self.prior.vae_scale_factor)
        return self.prior.encode_images(rgb)

    def _text(self, cond: GuidanceCond, b: int) -> torch.Tensor:
        if cond.text_embeddings is not None:
            text = cond.text_embeddings.to(self.prior.device, self.prior.dtype)
        else:
            prompts = [cond.prompts] if isinstance(cond.prompts, str) else list(cond.prompts or [""])
            if len(prompts) not in (1, b):
                raise ValueError(f"{len(prompts)} prompts for {b} images: give one per image or one for all")
            text = self.prior.encode_text(prompts)
        return text.expand(b, -1, -1) if text.shape[0] == 1 else text

    def predict_noise(self, z_t: torch.Tensor, t: int, cond: GuidanceCond) -> torch.Tensor:
        prior, cfg, b = self.prior, self.config, z_t.shape[0]
        text = self._text(cond, b)
        exp = cond.expression_embeddings
        if exp is None and cond.expressions is not None:
            exp = prior.encode_expressions(list(cond.expressions))
        ids = None if cond.id_embedding is None else prior.id_tokens(cond.id_embedding, b)
        # Branch-only guidance terms, s (eps_cond - eps_cond with that branch off): one more batch part each.
        id_guided = ids is not None and cfg.id_guidance_scale > 0
        exp_guided = exp is not None and cfg.exp_guidance_scale > 0
        cfg_guided = cfg.guidance_scale != 1.0
        if not (cfg_guided or id_guided or exp_guided):
            return prior.predict_noise(z_t, t, text, cond.id_embedding, exp, cfg.lambda_id, cfg.lambda_exp)
        parts = self._parts(cond, text, ids, b, cfg_guided, id_guided, exp_guided)
        exp_tokens = None if exp is None else prior.exp_tokens(exp, b)
        eps = prior.predict_noise_tokens(
            torch.cat([z_t] * len(parts)), t, torch.cat([p[0] for p in parts]),
            id_tokens=None if ids is None else torch.cat([p[1] for p in parts]),
            exp_tokens=None if exp_tokens is None else torch.cat([exp_tokens] * len(parts)),
            lambda_id=torch.cat([p[2] for p in parts]), lambda_exp=torch.cat([p[3] for p in parts]))
        chunks = list(eps.chunk(len(parts)))
        eps_u = chunks.pop(0) if cfg_guided else None
        eps_c = chunks.pop(0)
        out = eps_c if eps_u is None else eps_u + cfg.guidance_scale * (eps_c - eps_u)
        # Output-space extrapolation along one branch's direction alone (as CFG does for all conditions at once),
        # where a larger lambda would push that branch's attention off what the prior was trained on.
        if id_guided:
            out = out + cfg.id_guidance_scale * (eps_c - chunks.pop(0))
        if exp_guided:
            out = out + cfg.exp_guidance_scale * (eps_c - chunks.pop(0))
        return out

    def _parts(self, cond: GuidanceCond, text: torch.Tensor, ids: torch.Tensor | None, b: int,
               cfg_guided: bool, id_guided: bool, exp_guided: bool) -> list[tuple]:
        """The batch's parts, each (text, ID tokens, lambda_id, lambda_exp): unconditional, conditional, no ID,
        no expression (those asked for, in this order)."""
        cfg, device = self.config, self.prior.device
        # Per-sample branch weights made on the prior's device: host tensors would be copied in every layer.
        off, on = torch.zeros(b, device=device), torch.ones(b, device=device)
        conditional = (text, ids, on * cfg.lambda_id, on * cfg.lambda_exp)
        parts = [self._unconditional_part(cond, ids, b, off, on)] if cfg_guided else []
        parts.append(conditional)
        if id_guided:
            parts.append((text, *self._id_off(ids, b, off, on), on * cfg.lambda_exp))
        if exp_guided:
            parts.append((*conditional[:3], off))
        return parts

    def _unconditional_part(self, cond: GuidanceCond, ids: torch.Tensor | None, b: int,
                            off: torch.Tensor, on: torch.Tensor) -> tuple:
        """The CFG branch: the negative prompt, no expression, and the ID branch off (or, prior conventions
        ``uncond_id: zero`` as IP-Adapter FaceID, attending to the projected zero embedding)."""
        prior = self.prior
        if cond.negative_text_embeddings is not None:
            uncond = cond.negative_text_embeddings.to(prior.device, prior.dtype)
        else:
            uncond = prior.encode_text([cond.negative_prompt])
        uncond = uncond.expand(b, -1, -1) if uncond.shape[0] == 1 else uncond
        return uncond, *self._id_off(ids, b, off, on), off

    def _id_off(self, ids: torch.Tensor | None, b: int, off: torch.Tensor,
                on: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """ID tokens and branch weight of "no identity", as the prior was trained to read it."""
        if ids is not None and getattr(self.conventions, "uncond_id", "off") == "zero":
            prior = self.prior
            zero = prior.id_tokens(torch.zeros(prior.spec.id_dim, device=prior.device), b, unconditional=True)
            return zero, on * self.config.lambda_id
        return ids, off


class OracleGuidance(ScoreDistillation):
    """SDS whose noise prediction is the exact score of a known target: eps_hat = (z_t - sqrt(abar) z*) /
    sqrt(1 - abar). Then g = w(t) sqrt(abar / (1 - abar)) (z - z*), which pulls renders to the target:
    the whole optimisation loop tested without pretrained weights. Latents come from ``prior``'s VAE in
    ``vae`` mode, or from ``downsample_latents`` (no model needed)."""

    def __init__(self, target_images: torch.Tensor, config: GuidanceConfig | None = None,
                 schedule: TimestepSchedule | str = "geometry", total_steps: int = 1000, seed: int = 0,
                 prior: Any = None) -> None:
        config = config or GuidanceConfig(latent_mode="downsample")
        if config.latent_mode == "vae" and prior is None:
            raise ValueError("OracleGuidance in latent_mode 'vae' needs a prior (for its VAE)")
        abar = prior.noise_scheduler.alphas_cumprod if prior is not None else _sd15_alphas_cumprod()
        super().__init__(config, schedule, total_steps, abar, seed)
        self.prior = prior
        with torch.no_grad():
            self.target_latents = self.encode(target_images).detach()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.config.latent_mode == "downsample":
            return downsample_latents(images, self.config.latent_size)
        rgb = _resize(images[:, :3], self.config.latent_size * self.prior.vae_scale_factor)
        return self.prior.encode_images(rgb)

    def predict_noise(self, z_t: torch.Tensor, t: int, cond: GuidanceCond) -> torch.Tensor:
        abar = float(self.alphas_cumprod[t])
        return (z_t - math.sqrt(abar) * self.target_latents.to(z_t)) / math.sqrt(1.0 - abar)
