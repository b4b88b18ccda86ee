"""Texel maps: which surface point each texel of a UV atlas shows.

The texture field is queried at 3-D surface points, not at UV coordinates: the atlas has
disjoint charts (and each expression may have its own atlas), so a UV input would make texels on
either side of a seam unrelated. A :class:`TexelMap` links the two: the UV layout is rasterised
at ``T x T`` (row 0 at the top, ``v = 1``, as ``render.albedo.sample_texture`` reads it), and every
texel whose centre lies in a UV triangle gets the 3-D point interpolated from that triangle's
corners. Evaluating the field at those points and scattering the values back gives the UV texture
that the renderer samples and the exporter writes.

Texels outside every chart copy their nearest covered texel (``fill_index``): bilinear lookups
near a chart border, and mip levels, then read chart colours instead of empty texels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from idto3d.core.errors import IdtoError
from idto3d.texture.uv_atlas import UVMesh
from idto3d.render import rasterize_torch

__all__ = ["TexelMap", "texel_map", "scatter_texels"]


@dataclass
class TexelMap:
    """The covered texels of a ``size x size`` UV texture and the surface points they show.

    ``texel_index`` int64 ``[N]``: flat row-major indices (``row * size + col``, row 0 at the top)
    of texels whose centre lies in a UV triangle; ``points`` float32 ``[N, 3]``: the model-space
    point each shows; ``fill_index`` int64 ``[size * size]``: for every texel, the position
    (``0..N-1``) of the nearest covered texel in ``texel_index`` (itself when covered).
    """

    size: int
    texel_index: torch.Tensor
    points: torch.Tensor
    fill_index: torch.Tensor

    @property
    def coverage(self) -> float:
        """Share of the texture's texels that lie inside a chart."""
        return int(self.texel_index.numel()) / float(self.size * self.size)

    def to(self, device: torch.device | str) -> "TexelMap":
        return TexelMap(self.size, self.texel_index.to(device), self.points.to(device), self.fill_index.to(device))


def texel_map(uv_mesh: UVMesh, size: int) -> TexelMap:
    """Rasterise ``uv_mesh``'s layout at ``size x size`` texels and find the point each texel shows.

    Raises ``IdtoError`` when ``size`` is not a positive int or no texel centre falls in any UV
    triangle (the texture is too small for the atlas).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise IdtoError(f"texture size must be a positive integer, got {size!r}")
    uvs = torch.as_tensor(np.asarray(uv_mesh.uvs), dtype=torch.float32)
    positions = torch.as_tensor(np.asarray(uv_mesh.vertices), dtype=torch.float32)
    faces = torch.as_tensor(np.asarray(uv_mesh.faces), dtype=torch.int64)
    if faces.numel() == 0 or uvs.shape[0] == 0:
        raise IdtoError("cannot build a texel map: the UV mesh has no triangles; unwrap a non-empty mesh")
    # w = 1: barycentrics are affine in UV, so interpolated positions are exact on each triangle.
    # The rasteriser puts NDC y = +1 in row 0, so v = 1 lands in the top row, as the texture expects.
    clip = torch.cat([uvs * 2.0 - 1.0, torch.full_like(uvs[:, :1], 0.5), torch.ones_like(uvs[:, :1])], dim=1)
    with torch.no_grad():
        frags = rasterize_torch.rasterize(clip, faces, size)
        points = rasterize_torch.interpolate(positions, frags, faces).reshape(size * size, 3)
    covered = frags.mask.reshape(size, size)
    texel_index = covered.reshape(-1).nonzero().squeeze(1)
    n = int(texel_index.numel())
    if n == 0:
        raise IdtoError(
            f"no texel of a {size}x{size} texture lies inside the UV atlas' triangles; use a larger texture "
            "resolution (texture.resolution / export.texture_size)"
        )
    # Nearest covered texel (Euclidean, in texels) for every texel; covered ones are their own nearest.
    _, (rows, cols) = ndimage.distance_transform_edt(~covered.numpy(), return_indices=True)
    position_of = np.full(size * size, -1, dtype=np.int64)
    position_of[texel_index.numpy()] = np.arange(n, dtype=np.int64)
    fill_index = torch.from_numpy(position_of[(rows.astype(np.int64) * size + cols).reshape(-1)])
    return TexelMap(size=size, texel_index=texel_index, points=points[texel_index].contiguous(),
                    fill_index=fill_index)


def scatter_texels(values: torch.Tensor, texels: TexelMap) -> torch.Tensor:
    """Per-covered-texel ``values`` ``[N, C]`` -> a ``[T, T, C]`` texture, filled everywhere.

    A gather through ``fill_index``, so it is differentiable w.r.t. ``values``.
    """
    n = int(texels.texel_index.numel())
    if values.dim() != 2 or values.shape[0] != n:
        raise ValueError(f"values must be [{n}, C] (one row per covered texel), got {tuple(values.shape)}")
    out = values[texels.fill_index.to(values.device)]
    return out.view(texels.size, texels.size, values.shape[1])
