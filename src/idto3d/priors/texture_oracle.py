"""A texture oracle for score distillation: the exact score of a known textured head, per view and lighting.

The texture stage draws a camera and an environment map every step, so its oracle renders the known target
(mesh + albedo/roughness/metallic textures) from ``cond.cameras`` under ``cond.lighting`` with the stage's own
pseudo-albedo renderer and shading (``cond.shading``), and uses those latents as z* in
eps_hat = (z_t - sqrt(abar) z*) / sqrt(1 - abar). The texture loop can then be tested end to end, with a known
answer (the target's albedo map), without any pretrained prior.

Two kinds of target (``target_lighting``):

* ``"scene"``: the target is lit exactly as the render was (``cond.lighting``, ``cond.shading``). The optimum
  is then the target's material whatever the lighting: a check of the machinery (rendering, gradients,
  baking, sub-stages), not of the lighting strategy.
* ``"flat"``: the target is the known head's unlit albedo image, what an ideal albedo prior would produce: it
  knows nothing of the lighting the stage drew. Under one fixed environment the texture then bakes the inverse
  of that environment's shading into the albedo; under random lighting the shading averages out. This is the
  setting of the paper's figure-11 ablation (random vs fixed lighting).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from idto3d.core.config import GuidanceConfig
from idto3d.core.errors import IdtoError
from idto3d.priors.guidance import (
    GuidanceCond, ScoreDistillation, TimestepSchedule, _sd15_alphas_cumprod, downsample_latents,
)
from idto3d.render.backend import Rasterizer
from idto3d.render.mesh import Mesh
from idto3d.render.pseudo_albedo import FLAT_LIGHT, render_pseudo_albedo


@dataclass
class TexturedTarget:
    """A known textured mesh: the welded ``mesh`` plus ``uv``/``attribute_faces`` as ``UVMesh.render_inputs``
    gives them, and sRGB ``albedo`` ``[T, T, 3]``, ``roughness``/``metallic`` ``[T, T, 1]`` textures."""

    mesh: Mesh
    uv: torch.Tensor
    attribute_faces: torch.Tensor
    albedo: torch.Tensor
    roughness: torch.Tensor
    metallic: torch.Tensor


class TextureOracleGuidance(ScoreDistillation):
    """SDS toward pseudo-albedo renders of ``targets`` (one per expression index), in ``downsample`` latents."""

    def __init__(self, targets: Sequence[TexturedTarget], config: GuidanceConfig | None = None,
                 schedule: TimestepSchedule | str = "texture_diffuse", total_steps: int = 1000, seed: int = 0, *,
                 background: float = 1.0, rasterizer: Rasterizer | None = None,
                 target_lighting: str = "scene") -> None:
        config = config or GuidanceConfig(latent_mode="downsample")
        if config.latent_mode != "downsample":
            raise ValueError("TextureOracleGuidance works in latent_mode 'downsample' (no VAE needed)")
        if not targets:
            raise ValueError("TextureOracleGuidance needs at least one target")
        super().__init__(config, schedule, total_steps, _sd15_alphas_cumprod(), seed)
        if target_lighting not in ("scene", "flat"):
            raise ValueError(f"target_lighting must be 'scene' or 'flat', got {target_lighting!r}")
        self.target_lighting = target_lighting
        self.targets = list(targets)
        self.background = background
        self.rasterizer = rasterizer
        self._size: tuple[int, int] | None = None

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._size = (int(images.shape[-2]), int(images.shape[-1]))
        return downsample_latents(images, self.config.latent_size)

    @torch.no_grad()
    def render_targets(self, cond: GuidanceCond) -> torch.Tensor:
        """Target renders ``[B, 4, H, W]`` (sRGB + coverage) for the views and lighting in ``cond``."""
        if cond.cameras is None or cond.expression_indices is None or (
                cond.lighting is None and self.target_lighting == "scene"):
            raise IdtoError("TextureOracleGuidance needs cond.cameras, cond.expression_indices and cond.lighting "
                            "(where and how each render was made) to render its targets")
        cams = cond.cameras
        idx = [int(i) for i in cond.expression_indices]
        if len(idx) == 1 and len(cams) > 1:
            idx = idx * len(cams)
        if len(idx) != len(cams):
            raise IdtoError(f"{len(idx)} expression indices for {len(cams)} cameras: give one per view or one for all")
        out: list[torch.Tensor | None] = [None] * len(cams)
        for e in sorted(set(idx)):
            if not 0 <= e < len(self.targets):
                raise IdtoError(f"expression index {e} has no target (the oracle holds {len(self.targets)})")
            views = [i for i in range(len(cams)) if idx[i] == e]
            t = self.targets[e]
            flat = self.target_lighting == "flat"
            r = render_pseudo_albedo(t.mesh, cams[torch.tensor(views)], self._size, t.albedo, t.roughness,
                                     t.metallic, FLAT_LIGHT if flat else cond.lighting, uv=t.uv,
                                     attribute_faces=t.attribute_faces,
                                     diffuse_only=flat or cond.shading == "diffuse", background=self.background,
                                     rasterizer=self.rasterizer)
            img = r.for_guidance()
            for j, i in enumerate(views):
                out[i] = img[j]
        return torch.stack(out)  # type: ignore[arg-type]

    def predict_noise(self, z_t: torch.Tensor, t: int, cond: GuidanceCond) -> torch.Tensor:
        if self._size is None:
            raise IdtoError("TextureOracleGuidance has not seen a render yet")
        z_star = downsample_latents(self.render_targets(cond), self.config.latent_size)
        abar = float(self.alphas_cumprod[t])
        return (z_t - math.sqrt(abar) * z_star.to(z_t)) / math.sqrt(1.0 - abar)
