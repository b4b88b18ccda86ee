"""The mouth's inside in the texture: the strip between the lips (``geometry.mouth_cavity``) coloured dark.

Every offline expression shares the neutral's maps. In the neutral the strip is the lips' few millimetres of
contact, which a photo shows as the dark line between them; in an opened mouth the same texels cover the
cavity's walls and floor, so they take the colour of a mouth's shadowed inside (a dark red, near black) rather
than the lip colour the photo texture gives them. The strip's vertices and the lips' inner rims (the next
vertex ring) are fully dark, the lips' rows beyond keep their colour, and the triangles between them blend
(barycentric interpolation in the UV layout).
"""

from __future__ import annotations

import numpy as np
import torch

from idto3d.render import rasterize_torch
from idto3d.texture.uv_atlas import UVMesh

MOUTH_TONE = (0.16, 0.04, 0.04)  # sRGB: the shadowed inside of a mouth
MOUTH_ROUGHNESS = 1.0
RINGS = 1        # the lips' inner rims (the strip's neighbours) are the cavity's edge: dark too
SUPERSAMPLE = 4


def mouth_weight(atlas: UVMesh, vertices: np.ndarray, size: int, rings: int = RINGS,
                 supersample: int = SUPERSAMPLE) -> np.ndarray:
    """``[size, size]`` in [0, 1]: how much each texel of ``atlas``'s layout is mouth inside, 1 at the layout
    vertices ``vertices`` (the strip) and ``rings`` vertex rings around them, falling to 0 across the next
    triangles (row 0 at the top, as the maps are). The strip is a sliver in UV (a few texels, less at the
    corners), so the weight is rasterised ``supersample`` times finer and each texel takes its sub-texels' largest:
    every texel a strip triangle touches is darkened, and no stretched triangle samples a gap."""
    faces = np.asarray(atlas.faces, np.int64)
    dark = np.zeros(atlas.uvs.shape[0], bool)
    dark[np.asarray(vertices, np.int64)] = True
    for _ in range(rings):
        dark[faces[dark[faces].any(1)]] = True
    weight = dark.astype(np.float32)
    faces = faces[dark[faces].any(1)]
    if faces.shape[0] == 0:
        return np.zeros((size, size), np.float32)
    uvs = torch.as_tensor(np.asarray(atlas.uvs), dtype=torch.float32)
    # The same UV-to-texel mapping as ``texture.texels.texel_map`` (v = 1 in row 0).
    clip = torch.cat([uvs * 2.0 - 1.0, torch.full_like(uvs[:, :1], 0.5), torch.ones_like(uvs[:, :1])], dim=1)
    f = torch.from_numpy(faces)
    fine = size * supersample
    with torch.no_grad():
        frags = rasterize_torch.rasterize(clip, f, fine)
        out = rasterize_torch.interpolate(torch.from_numpy(weight)[:, None], frags, f)[0, ..., 0]
    out = out.reshape(size, supersample, size, supersample).amax(dim=(1, 3))
    return out.numpy().clip(0.0, 1.0)


def paint_mouth(albedo: np.ndarray, roughness: np.ndarray, weight: np.ndarray,
                tone: tuple[float, float, float] = MOUTH_TONE) -> tuple[np.ndarray, np.ndarray]:
    """``(albedo [H, W, 3], roughness [H, W])`` blended by ``weight [H, W]`` toward ``tone`` (sRGB) and a fully
    rough surface: the cavity's walls are stretched triangles whose normals change from column to column, and a
    sheen on them would draw bright streaks across the dark."""
    w = np.asarray(weight, np.float32)
    a = np.asarray(albedo, np.float32) * (1.0 - w[..., None]) + np.asarray(tone, np.float32) * w[..., None]
    r = np.asarray(roughness, np.float32) * (1.0 - w) + MOUTH_ROUGHNESS * w
    return a.astype(np.float32), r.astype(np.float32)
