"""Signed distances to a triangle mesh, and the point samples used to regress a field to it.

Sign comes from libigl's fast winding number, which stays right for small defects (tiny holes,
slightly self-intersecting scans) where ray-parity or pseudo-normal signs flip whole regions.
"""

from __future__ import annotations

import numpy as np
import torch

from idto3d.core.errors import MeshError
from idto3d.geometry.metrics import sample_surface
from idto3d.render.mesh import Mesh

__all__ = ["mesh_sdf", "sample_sdf_training_points"]

# Points per libigl call: bounds peak memory (libigl keeps several [N, 3] float64 outputs) while
# staying large enough that its per-call set-up (AABB tree, winding-number tree) is amortised.
_SDF_CHUNK = 1 << 18


def mesh_sdf(mesh: Mesh, points: torch.Tensor, chunk: int = _SDF_CHUNK) -> torch.Tensor:
    """Signed distance ``[N]`` from ``points [N, 3]`` to ``mesh`` (negative inside), float32.

    Exact distance to the closest triangle, sign from the fast winding number (robust to small
    holes and self-intersections); computed in float64 on the CPU in chunks of ``chunk`` points
    and returned on ``points``' device. Not differentiable: it is a regression target.
    ~20 us a point against the ~88k-face built-in template on 2 cores.
    """
    import igl

    if mesh.faces.numel() == 0:
        raise MeshError("cannot compute signed distances to a mesh with no faces")
    pts = points.detach().reshape(-1, 3)
    v = np.ascontiguousarray(mesh.vertices.detach().cpu().double().numpy())
    f = np.ascontiguousarray(mesh.faces.detach().cpu().numpy().astype(np.int64))
    p = pts.cpu().double().numpy()
    out = np.empty(p.shape[0], dtype=np.float64)
    for i in range(0, p.shape[0], chunk):
        block = np.ascontiguousarray(p[i : i + chunk])
        s, _, closest = igl.signed_distance(block, v, f, sign_type=igl.SIGNED_DISTANCE_TYPE_FAST_WINDING_NUMBER)[:3]
        # libigl scales the distance by (1 - 2w) with w the *approximate* winding number, which
        # is off by ~0.5% far from the mesh; take only the sign from it, the size from the
        # closest point.
        dist = np.linalg.norm(block - np.asarray(closest), axis=1)
        out[i : i + chunk] = np.where(np.asarray(s).reshape(-1) < 0, -dist, dist)
    return torch.from_numpy(out.astype(np.float32)).to(points.device)


def sample_sdf_training_points(
    mesh: Mesh,
    n_surface: int,
    n_volume: int,
    sigma: tuple[float, ...] | float = (0.01, 0.05),
    bound: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Points and their exact SDF for regressing a field to ``mesh`` (the DMTet/Fantasia3D recipe).

    ``n_surface`` area-weighted surface samples, split evenly across the noise scales ``sigma``
    and jittered by isotropic Gaussian noise of that std (tight samples pin the zero level set,
    loose ones its gradient), plus ``n_volume`` uniform samples in ``[-bound, bound]^3`` so the
    far field has the right sign. Jittered points are clamped into the same cube. Returns
    ``(points [n_surface + n_volume, 3], sdf [n_surface + n_volume])`` in float32 on the CPU,
    deterministic under ``generator``.
    """
    if n_surface < 0 or n_volume < 0 or n_surface + n_volume == 0:
        raise MeshError(f"need a positive number of SDF samples, got n_surface={n_surface}, n_volume={n_volume}")
    sigmas = (float(sigma),) if isinstance(sigma, (int, float)) else tuple(float(s) for s in sigma)
    if not sigmas or any(s < 0 for s in sigmas):
        raise MeshError(f"sigma must be one or more non-negative noise scales, got {sigma!r}")
    mesh = mesh.to("cpu").detach()
    parts = []
    if n_surface > 0:
        surf = sample_surface(mesh, n_surface, generator)
        # Split the samples as evenly as possible over the scales (earlier scales get the remainder).
        counts = [n_surface // len(sigmas) + (i < n_surface % len(sigmas)) for i in range(len(sigmas))]
        std = torch.cat([torch.full((c, 1), s) for c, s in zip(counts, sigmas)])
        noise = torch.randn(n_surface, 3, generator=generator) * std
        parts.append((surf + noise).clamp(-bound, bound))
    if n_volume > 0:
        parts.append((torch.rand(n_volume, 3, generator=generator) * 2.0 - 1.0) * bound)
    points = torch.cat(parts).float()
    return points, mesh_sdf(mesh, points)
