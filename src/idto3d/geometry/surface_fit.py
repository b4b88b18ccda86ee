"""Fit one mesh onto another surface without changing its topology (for morph targets across DMTet topologies).

Each expression of the SDS path is extracted from its own DMTet field, so its mesh has its own vertices and
faces. A morph target needs the neutral's vertices moved onto the expression's surface instead. Each round pulls
every vertex toward its closest point on the target mesh (libigl) while keeping the displacement smooth: it
minimises ``|V - C|^2 + w |L (V - V0)|^2`` with ``L`` the uniform graph Laplacian of the source mesh, so
neighbouring vertices move alike and the surface cannot fold where closest points jump. ``w`` is annealed from
``smoothness`` down to ``smoothness * final_ratio`` so the fit ends close to the surface.
"""

from __future__ import annotations

from dataclasses import dataclass

import igl
import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import factorized

from idto3d.core.errors import IdtoError
from idto3d.core.units import METRES_PER_UNIT


@dataclass(frozen=True)
class SurfaceFit:
    """The fitted vertices (same order and faces as the source) and their distance to the target surface."""

    vertices: np.ndarray  # float64 [V, 3], model units
    distances: np.ndarray  # float64 [V], model units

    def error_mm(self, metres_per_unit: float = METRES_PER_UNIT) -> dict[str, float]:
        """Mean / 95th percentile / max distance of the fitted vertices to the target, in millimetres."""
        return distance_stats_mm(self.distances, metres_per_unit)


def distance_stats_mm(distances: np.ndarray, metres_per_unit: float = METRES_PER_UNIT) -> dict[str, float]:
    """Mean / 95th percentile / max of model-unit distances, in millimetres."""
    d = np.asarray(distances, dtype=np.float64) * metres_per_unit * 1000.0
    return {"mean_mm": float(d.mean()), "p95_mm": float(np.percentile(d, 95)), "max_mm": float(d.max())}


def uniform_laplacian(faces: np.ndarray, n_vertices: int) -> sp.csr_matrix:
    """``L = I - D^-1 A`` (each vertex minus the mean of its neighbours); isolated vertices get a zero row."""
    adj = igl.adjacency_matrix(np.ascontiguousarray(faces, dtype=np.int64)).astype(np.float64).tocsr()
    adj.resize((n_vertices, n_vertices))
    deg = np.asarray(adj.sum(axis=1)).ravel()
    inv = np.where(deg > 0, 1.0 / np.maximum(deg, 1e-12), 0.0)
    return (sp.diags((deg > 0).astype(np.float64)) - sp.diags(inv) @ adj).tocsr()


def closest_distances(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance of each point to the triangle mesh and the closest point on it."""
    sq, _, closest = igl.point_mesh_squared_distance(
        np.ascontiguousarray(points, dtype=np.float64), np.ascontiguousarray(vertices, dtype=np.float64),
        np.ascontiguousarray(faces, dtype=np.int64))
    return np.sqrt(np.maximum(sq, 0.0)), closest


def fit_to_surface(vertices: np.ndarray, faces: np.ndarray, target_vertices: np.ndarray,
                   target_faces: np.ndarray, *, iterations: int = 12, smoothness: float = 10.0,
                   final_ratio: float = 1e-3) -> SurfaceFit:
    """Move ``vertices`` (topology ``faces``, kept) onto the surface ``(target_vertices, target_faces)``."""
    v0 = np.asarray(vertices, dtype=np.float64)
    if v0.ndim != 2 or v0.shape[1] != 3 or len(target_faces) == 0:
        raise IdtoError("surface fit needs [V, 3] vertices and a non-empty target mesh")
    if iterations < 1 or smoothness < 0 or not 0 < final_ratio <= 1:
        raise IdtoError("surface fit: iterations >= 1, smoothness >= 0 and 0 < final_ratio <= 1")
    lap = uniform_laplacian(faces, len(v0))
    ltl = (lap.T @ lap).tocsc()
    eye = sp.identity(len(v0), format="csc")
    v = v0.copy()
    for k in range(iterations):
        _, closest = closest_distances(v, target_vertices, target_faces)
        w = smoothness * final_ratio ** (k / max(iterations - 1, 1))
        # Normal equations of |V - C|^2 + w |L (V - V0)|^2: (I + w L^T L) V = C + w L^T L V0.
        solve = factorized((eye + w * ltl).tocsc())
        rhs = closest + w * (ltl @ v0)
        v = np.stack([solve(rhs[:, i]) for i in range(3)], axis=1)
    dist, _ = closest_distances(v, target_vertices, target_faces)
    return SurfaceFit(v, dist)
