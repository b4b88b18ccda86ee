"""Smooth away the crumpled patches of the fitted face mesh (the nostril wings), which render as speckles.

The face model's mesh folds over itself in the nostrils: neighbouring triangles meet at more than
``CRUMPLE_DEGREES`` there, so under any light their normals flicker from dark to bright texel to texel, and a
face recogniser reads the nose as noise. The patch (those vertices near the given landmarks, grown by a few
rings) is relaxed by Taubin smoothing (Taubin 1995: a shrinking then an inflating Laplacian step, so the patch
does not sink), every vertex outside it held. Positions only: the topology (and so the vertex indices, the UV
layout and the morph targets built on them) is unchanged.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

CRUMPLE_DEGREES = 60.0  # dihedral angle between neighbouring triangles above which a patch counts as crumpled
_RINGS = 2              # the patch grows this many vertex rings around its crumpled edges
_ITERATIONS = 20
_LAMBDA, _MU = 0.5, -0.53


def _adjacency(faces: np.ndarray, n: int) -> sp.csr_matrix:
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    a = sp.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n)).tocsr()
    a = ((a + a.T) > 0).astype(np.float64)
    return a.tocsr()


def crumpled_vertices(vertices: np.ndarray, faces: np.ndarray, near: np.ndarray, radius: float,
                      degrees: float = CRUMPLE_DEGREES, rings: int = _RINGS) -> np.ndarray:
    """``[V]`` bool: the vertices of edges whose triangles meet at more than ``degrees``, within ``radius`` of
    one of the points ``near`` ``[L, 3]``, grown by ``rings`` vertex rings."""
    import trimesh

    mesh = trimesh.Trimesh(vertices, faces, process=False)
    sharp = mesh.face_adjacency_edges[np.degrees(mesh.face_adjacency_angles) > degrees]
    mask = np.zeros(len(vertices), bool)
    mask[np.unique(sharp)] = True
    d = np.linalg.norm(vertices[:, None, :] - np.asarray(near)[None], axis=2).min(1)
    mask &= d < radius
    adj = _adjacency(faces, len(vertices))
    for _ in range(rings):
        mask = mask | (adj @ mask.astype(np.float64) > 0)
    return mask


def relax(vertices: np.ndarray, faces: np.ndarray, mask: np.ndarray, iterations: int = _ITERATIONS
          ) -> np.ndarray:
    """``vertices`` with those in ``mask`` Taubin-smoothed (uniform Laplacian), the others held."""
    adj = _adjacency(faces, len(vertices))
    degree = np.asarray(adj.sum(1)).ravel()
    inv = np.divide(1.0, degree, out=np.zeros_like(degree), where=degree > 0)[:, None]
    v = np.asarray(vertices, dtype=np.float64).copy()
    m = mask[:, None]
    for _ in range(iterations):
        for step in (_LAMBDA, _MU):
            v = np.where(m, v + step * (adj @ v * inv - v), v)
    return v
