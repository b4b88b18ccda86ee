"""Unlit colour (albedo) images: what the texture stage's albedo prior looks at.

Colours come either from per-vertex attributes or from a UV texture sampled bilinearly
(``torch.nn.functional.grid_sample``), so the image is differentiable w.r.t. the vertex colours,
the texture and the UVs. Background is a flat colour, and silhouettes are antialiased as in
``render_normal_map``.

UV convention (OpenGL / trimesh / glTF-after-load): ``u`` grows to the right, ``v`` grows UP,
so ``v = 0`` is the texture image's bottom row; textures are ``[H, W, C]`` with row 0 at the top.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from idto3d.core.errors import IdtoError
from idto3d.render.backend import Rasterizer, get_rasterizer
from idto3d.render.camera import Camera
from idto3d.render.fragments import Fragments, checked_faces, parse_resolution
from idto3d.render.mesh import Mesh


@dataclass
class AlbedoRender:
    image: torch.Tensor  # [B, H, W, C] colours over the background, antialiased
    mask: torch.Tensor  # [B, H, W, 1] antialiased coverage
    albedo: torch.Tensor  # [B, H, W, C] surface colour before compositing, zeros on background
    fragments: Fragments


def sample_texture(texture: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample ``texture`` ``[Ht, Wt, C]`` (or ``[B, Ht, Wt, C]``) at ``uv`` ``[B, H, W, 2]``.

    Texel centres sit at ``(i + 0.5) / size``; lookups outside [0, 1] clamp to the border.
    Returns ``[B, H, W, C]``.
    """
    B = uv.shape[0]
    tex = texture if texture.dim() == 4 else texture.unsqueeze(0)
    tex = tex.permute(0, 3, 1, 2).expand(B, -1, -1, -1)  # [B, C, Ht, Wt]
    # grid_sample's y = -1 is the top row; v = 1 is the top of the texture.
    grid = torch.stack([uv[..., 0] * 2 - 1, 1 - uv[..., 1] * 2], -1).to(tex.dtype)
    out = F.grid_sample(tex, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.permute(0, 2, 3, 1)


def _check_attribute(name: str, value: torch.Tensor, n: int, channels: int | None, batch: int) -> torch.Tensor:
    if value.dim() == 2:
        value = value.unsqueeze(0)
    if value.dim() != 3 or value.shape[0] not in (1, batch) or value.shape[1] != n or (
            channels is not None and value.shape[2] != channels):
        want = f"[{n}, {channels if channels is not None else 'C'}]"
        raise IdtoError(f"{name} must be {want} (one row per vertex of the attribute faces), "
                        f"got {tuple(value.shape)}")
    if not value.is_floating_point():
        raise IdtoError(f"{name} must be floating point (colours in [0, 1]), got {value.dtype}")
    return value


def render_albedo(
    mesh: Mesh,
    camera: Camera,
    resolution: int | tuple[int, int],
    vertex_colors: torch.Tensor | None = None,
    *,
    uv: torch.Tensor | None = None,
    texture: torch.Tensor | None = None,
    attribute_faces: torch.Tensor | None = None,
    background: float | torch.Tensor = 1.0,
    rasterizer: Rasterizer | None = None,
) -> AlbedoRender:
    """Render ``mesh``'s unlit colour from each of ``camera``'s views.

    Give either ``vertex_colors`` ``[V, C]`` (or ``[B, V, C]``), or ``uv`` ``[V, 2]`` plus
    ``texture`` ``[Ht, Wt, C]`` (or ``[B, Ht, Wt, C]``). ``attribute_faces`` ``[F, 3]`` indexes the
    colours/UVs when they are not one per mesh vertex (e.g. UVs split at seams while positions
    are shared), like nvdiffrast's ``interpolate(attr, rast, tri)``; it defaults to ``mesh.faces``.
    ``background`` is a number or a ``[C]`` colour.
    """
    if (vertex_colors is None) == (uv is None and texture is None):
        raise IdtoError("render_albedo needs either vertex_colors, or uv together with texture (not both)")
    if vertex_colors is None and (uv is None or texture is None):
        raise IdtoError("a UV-textured render needs both uv [V, 2] and texture [H, W, C]")
    H, W = parse_resolution(resolution)
    r = rasterizer if rasterizer is not None else get_rasterizer("auto", mesh.device)
    camera = camera.to(mesh.device)
    B = len(camera)

    attr_faces = mesh.faces if attribute_faces is None else attribute_faces.to(mesh.device)
    if attr_faces.shape != mesh.faces.shape:
        raise IdtoError(f"attribute_faces must have the mesh's face shape {tuple(mesh.faces.shape)}, "
                        f"got {tuple(attr_faces.shape)}")

    clip = camera.project(mesh.vertices)  # [B, V, 4]
    fragments = r.rasterize(clip, mesh.faces, (H, W))
    covered = fragments.mask.unsqueeze(-1)

    def rows(value: torch.Tensor) -> int:
        # Per mesh vertex unless attribute_faces says otherwise.
        if attribute_faces is None:
            return int(mesh.vertices.shape[0])
        return int(value.shape[-2]) if value.dim() >= 2 else 0

    if vertex_colors is not None:
        colors = _check_attribute("vertex_colors", vertex_colors, rows(vertex_colors), None, B)
        attr_faces = checked_faces(attr_faces, colors.shape[1])
        albedo = r.interpolate(colors, fragments, attr_faces)
    else:
        assert uv is not None and texture is not None
        uv_ = _check_attribute("uv", uv, rows(uv), 2, B)
        if texture.dim() not in (3, 4) or (texture.dim() == 4 and texture.shape[0] not in (1, B)):
            raise IdtoError(f"texture must be [H, W, C] or [{B}, H, W, C], got {tuple(texture.shape)}")
        if not texture.is_floating_point():
            raise IdtoError(f"texture must be floating point in [0, 1], got {texture.dtype}")
        attr_faces = checked_faces(attr_faces, uv_.shape[1])
        pixel_uv = r.interpolate(uv_.to(texture.dtype), fragments, attr_faces)  # [B, H, W, 2]
        albedo = sample_texture(texture.to(mesh.device), pixel_uv)
        albedo = albedo * covered.to(albedo.dtype)

    C = albedo.shape[-1]
    bg = torch.as_tensor(background, dtype=albedo.dtype, device=albedo.device)
    if bg.dim() > 1 or (bg.dim() == 1 and bg.shape[0] not in (1, C)):
        raise IdtoError(f"background must be a number or a colour with {C} channels, got shape {tuple(bg.shape)}")
    coverage = covered.to(albedo.dtype)
    rgb = albedo * coverage + bg * (1 - coverage)
    aa = r.antialias(torch.cat([rgb, coverage], -1), fragments, clip, mesh.faces)
    return AlbedoRender(image=aa[..., :C], mask=aa[..., C:], albedo=albedo, fragments=fragments)
