"""Known target meshes for the geometry oracle tests: the built-in head reshaped in closed form.

Why whole-head reshapes and not a local bump: a template fit on a CPU-sized grid (24 cells) already sits
~0.003 units (mean surface gap) from the template, and a bump of 0.15 units over a 0.15-unit patch moves
the mean gap by about as much, so a 3x Chamfer reduction toward a bump is below what the grid resolves.
Reshaping the whole head by 10-20 % gives a 0.03-0.07 start gap, well above that floor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from idto3d.geometry.template import build_head_template
from idto3d.render.mesh import Mesh


def scaled_head(scale: Sequence[float], resolution: int = 64) -> Mesh:
    """The built-in head scaled per axis (x: width, y: height, z: depth) about the origin."""
    mesh = build_head_template(resolution)
    return Mesh(mesh.vertices * torch.tensor(scale, dtype=mesh.vertices.dtype), mesh.faces)


def bumped_head(centre: Sequence[float], amplitude: float, sigma: float, resolution: int = 64) -> Mesh:
    """The built-in head with a Gaussian bump of height ``amplitude`` pushed out along the normals."""
    mesh = build_head_template(resolution)
    v = mesh.vertices
    weight = torch.exp(-(v - torch.tensor(centre, dtype=v.dtype)).square().sum(-1) / (2.0 * sigma**2))
    return Mesh(v + amplitude * weight[:, None] * mesh.vertex_normals(), mesh.faces)


def small_head() -> Mesh:
    """15 % smaller in every direction (start gap ~0.067 units)."""
    return scaled_head((0.85, 0.85, 0.85))


def wide_head() -> Mesh:
    """25 % wider, 10 % shorter and 12 % shallower (start gap ~0.043 units, ~0.065 from ``small_head``)."""
    return scaled_head((1.25, 0.9, 0.88))
