"""Normal maps in camera coordinates: what the geometry stage's normal prior looks at.

A pixel's colour is (n + 1) / 2 of the unit surface normal in camera space (x right, y up,
z toward the viewer), so a surface facing the camera is (0.5, 0.5, 1): blue-violet. ``axis_signs`` flips axes
for priors trained on another camera convention (e.g. OpenCV's y down, z away: (1, -1, -1)). The background
is white by default (a prior's conventions may ask for another colour, e.g. black for HumanNorm's normal
model), and silhouettes are antialiased so the image is differentiable w.r.t. the outline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from idto3d.core.errors import IdtoError
from idto3d.render.backend import Rasterizer, get_rasterizer
from idto3d.render.camera import Camera
from idto3d.render.fragments import Fragments, parse_resolution
from idto3d.render.mesh import Mesh

SHADINGS = ("smooth", "flat")


@dataclass
class NormalRender:
    image: torch.Tensor  # [B, H, W, 3] in [0, 1], encoded normals over the background colour
    mask: torch.Tensor  # [B, H, W, 1] antialiased coverage, differentiable at silhouettes
    normals: torch.Tensor  # [B, H, W, 3] unit camera-space normals, zeros on background
    fragments: Fragments


def _scaled(x: torch.Tensor, factor: float | Sequence[float]) -> torch.Tensor:
    """``x`` times a scalar or a per-channel RGB factor; a factor equal on all channels stays a Python number,
    so the common cases (white or black background, no axis flip) make no tensor on the device per render."""
    values = [float(v) for v in factor] if isinstance(factor, Sequence) else [float(factor)]
    if len(values) not in (1, 3):
        raise IdtoError(f"expected one value or three (RGB / xyz), got {values}")
    if all(v == values[0] for v in values):
        return x * values[0]
    return x * torch.tensor(values, dtype=x.dtype).to(x.device)


def render_normal_map(
    mesh: Mesh,
    camera: Camera,
    resolution: int | tuple[int, int],
    background: float | Sequence[float] = 1.0,
    shading: str = "smooth",
    rasterizer: Rasterizer | None = None,
    axis_signs: Sequence[float] = (1.0, 1.0, 1.0),
) -> NormalRender:
    """Render ``mesh`` from each of ``camera``'s views as a camera-space normal map.

    ``shading="smooth"`` interpolates area-weighted vertex normals, ``"flat"`` uses face normals.
    An empty mesh renders as background.
    """
    if shading not in SHADINGS:
        raise IdtoError(f"shading must be one of {SHADINGS}, got {shading!r}")
    H, W = parse_resolution(resolution)
    r = rasterizer if rasterizer is not None else get_rasterizer("auto", mesh.device)

    camera = camera.to(mesh.device)
    clip = camera.project(mesh.vertices)  # [B, V, 4]
    fragments = r.rasterize(clip, mesh.faces, (H, W))
    rotation = camera.world_to_camera_rotation().to(mesh.vertices.dtype)  # [B, 3, 3]
    covered = fragments.mask.unsqueeze(-1)

    if shading == "smooth":
        n_cam = torch.einsum("bij,vj->bvi", rotation, mesh.vertex_normals())
        n = r.interpolate(n_cam, fragments, mesh.faces)
        # Interpolated unit vectors are shorter than 1 inside a triangle.
        n = torch.nn.functional.normalize(n, dim=-1, eps=1e-12)
    else:
        f_cam = torch.einsum("bij,fj->bfi", rotation, mesh.face_normals())  # [B, F, 3]
        idx = fragments.triangle_id.clamp(min=0).flatten(1)  # [B, H*W]
        n = torch.gather(f_cam, 1, idx.unsqueeze(-1).expand(-1, -1, 3)).view(-1, H, W, 3)
        n = n * covered
    coverage = covered.to(n.dtype)
    rgb = (_scaled(n, axis_signs) * 0.5 + 0.5) * coverage + _scaled(1 - coverage, background)
    # One antialias pass for colour and coverage, so both see the same silhouette.
    aa = r.antialias(torch.cat([rgb, coverage], -1), fragments, clip, mesh.faces)
    return NormalRender(image=aa[..., :3], mask=aa[..., 3:], normals=n, fragments=fragments)
