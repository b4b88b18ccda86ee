"""A mesh oracle for score distillation: the exact score of known target meshes, per view and expression.

``OracleGuidance`` (priors/guidance.py) pulls renders toward fixed images. The geometry stage samples a
new camera every step, so its oracle has to render the target from that camera: ``MeshOracleGuidance``
renders ``targets[cond.expression_indices[i]]`` from ``cond.cameras[i]`` with the stage's renderer (camera
-space normal map + coverage mask) and uses those latents as z* in eps_hat = (z_t - sqrt(abar) z*) /
sqrt(1 - abar). The SDS gradient is then w(t) sqrt(abar / (1 - abar)) (z - z*): the geometry loop can be
tested end to end (a known answer, measured by Chamfer distance) without any pretrained prior.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from idto3d.core.config import GuidanceConfig
from idto3d.core.errors import IdtoError
from idto3d.priors.guidance import (
    GuidanceCond, ScoreDistillation, TimestepSchedule, _resize, _sd15_alphas_cumprod, downsample_latents,
)
from idto3d.render.backend import Rasterizer, get_rasterizer
from idto3d.render.camera import Camera
from idto3d.render.mesh import Mesh
from idto3d.render.normals import render_normal_map


class MeshOracleGuidance(ScoreDistillation):
    """SDS toward normal-map renders of ``targets`` (one mesh per expression index).

    ``resolution`` is the target render size (None = the size of the images passed in); ``background``
    and ``shading`` must match how the stage renders, or the oracle pulls toward a different image.
    Latents come from ``downsample_latents`` (default) or, in ``vae`` mode, from ``prior``'s VAE.
    """

    def __init__(self, targets: Sequence[Mesh], resolution: int | None = None, config: GuidanceConfig | None = None,
                 schedule: TimestepSchedule | str = "geometry", total_steps: int = 1000, seed: int = 0, *,
                 background: float = 1.0, shading: str = "smooth", prior: Any = None,
                 rasterizer: Rasterizer | None = None) -> None:
        config = config or GuidanceConfig(latent_mode="downsample")
        if config.latent_mode == "vae" and prior is None:
            raise ValueError("MeshOracleGuidance in latent_mode 'vae' needs a prior (for its VAE)")
        if not targets:
            raise ValueError("MeshOracleGuidance needs at least one target mesh")
        abar = prior.noise_scheduler.alphas_cumprod if prior is not None else _sd15_alphas_cumprod()
        super().__init__(config, schedule, total_steps, abar, seed)
        self.targets = [Mesh(m.vertices.detach(), m.faces) for m in targets]
        self.resolution = resolution
        self.background = background
        self.shading = shading
        self.prior = prior
        self.rasterizer = rasterizer
        self._size: tuple[int, int] | None = None

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        # The size of the stage's renders, so target renders default to the same pixels.
        self._size = (int(images.shape[-2]), int(images.shape[-1]))
        if self.config.latent_mode == "downsample":
            return downsample_latents(images, self.config.latent_size)
        rgb = _resize(images[:, :3], self.config.latent_size * self.prior.vae_scale_factor)
        return self.prior.encode_images(rgb)

    @torch.no_grad()
    def render_targets(self, cameras: Camera, expression_indices: Sequence[int]) -> torch.Tensor:
        """Target normal maps + mask ``[B, 4, H, W]`` in [0, 1], one per camera view."""
        b = len(cameras)
        idx = list(expression_indices)
        if len(idx) == 1 and b > 1:
            idx = idx * b
        if len(idx) != b:
            raise IdtoError(f"{len(idx)} expression indices for {b} cameras: give one per view or one for all")
        for e in idx:
            if not 0 <= int(e) < len(self.targets):
                raise IdtoError(f"expression index {e} has no target mesh (the oracle holds {len(self.targets)})")
        size = self.resolution or self._size
        if size is None:
            raise IdtoError("MeshOracleGuidance needs a resolution before it has seen any image")
        out: list[torch.Tensor | None] = [None] * b
        for e in sorted(set(int(i) for i in idx)):
            views = [i for i in range(b) if int(idx[i]) == e]
            mesh = self.targets[e]
            cams = cameras[torch.tensor(views)]
            r = self.rasterizer or get_rasterizer("auto", mesh.device)
            nr = render_normal_map(mesh, cams, size, background=self.background, shading=self.shading, rasterizer=r)
            img = torch.cat([nr.image, nr.mask], dim=-1).permute(0, 3, 1, 2)
            for j, i in enumerate(views):
                out[i] = img[j]
        return torch.stack(out)  # type: ignore[arg-type]

    def predict_noise(self, z_t: torch.Tensor, t: int, cond: GuidanceCond) -> torch.Tensor:
        if cond.cameras is None or cond.expression_indices is None:
            raise IdtoError("MeshOracleGuidance needs cond.cameras and cond.expression_indices (where each "
                            "render came from) to render its targets")
        target = self.render_targets(cond.cameras, cond.expression_indices).to(z_t.device)
        if self.config.latent_mode == "downsample":
            z_star = downsample_latents(target, self.config.latent_size)
        else:
            size = self.config.latent_size * self.prior.vae_scale_factor
            z_star = self.prior.encode_images(_resize(target[:, :3], size))
        abar = float(self.alphas_cumprod[t])
        return (z_t - math.sqrt(abar) * z_star.to(z_t)) / math.sqrt(1.0 - abar)
