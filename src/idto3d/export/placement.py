"""Put an unwrapped mesh into the export frame: centred, in metres, with smooth vertex normals.

Export convention: +Y up, the face looks along +Z, right-handed, 1 unit = 1 metre, the bounding
box centred at the origin (the model-space head is 1 unit = ``METRES_PER_UNIT`` m).
"""

from __future__ import annotations

import numpy as np

from idto3d.core.errors import IdtoError
from idto3d.texture.uv_atlas import UVMesh


def metric_positions(uv_mesh: UVMesh, metres_per_unit: float) -> np.ndarray:
    """Vertices scaled to metres with the bounding box centred at the origin (float32)."""
    if not (isinstance(metres_per_unit, (int, float)) and np.isfinite(metres_per_unit) and metres_per_unit > 0):
        raise IdtoError(f"metres_per_unit must be a positive number, got {metres_per_unit!r}")
    v = uv_mesh.vertices.astype(np.float64)
    return ((v - box_centre(v)) * metres_per_unit).astype(np.float32)


def box_centre(vertices: np.ndarray) -> np.ndarray:
    """The centre of the vertices' axis-aligned bounding box (float64): the origin of the export frame."""
    v = np.asarray(vertices, dtype=np.float64)
    return 0.5 * (v.min(0) + v.max(0))


def smooth_normals(uv_mesh: UVMesh) -> np.ndarray:
    """Area-weighted unit vertex normals, accumulated on the source vertices so UV seams stay smooth."""
    n_src = int(uv_mesh.vmapping.max()) + 1
    src_faces = uv_mesh.vmapping[uv_mesh.faces]
    v = uv_mesh.vertices.astype(np.float64)
    a, b, c = (v[uv_mesh.faces[:, i]] for i in range(3))
    fn = np.cross(b - a, c - a)  # length = 2 * area: area weighting for free
    acc = np.zeros((n_src, 3))
    for i in range(3):
        np.add.at(acc, src_faces[:, i], fn)
    n = acc[uv_mesh.vmapping]
    length = np.linalg.norm(n, axis=1, keepdims=True)
    # A vertex whose faces cancel exactly has no normal; +Y keeps the accessor unit-length (glTF requires it).
    n = np.where(length > 1e-20, n / np.maximum(length, 1e-20), np.array([0.0, 1.0, 0.0]))
    return n.astype(np.float32)


def tangents(uv_mesh: UVMesh, normals: np.ndarray) -> np.ndarray:
    """Per-vertex tangent frames ``[V', 4]`` for a tangent-space normal map (glTF TANGENT layout).

    ``xyz`` points along increasing ``u``, orthonormalised against the vertex normal; ``w = +-1``
    makes ``cross(normal, xyz) * w`` point along increasing ``v`` (our bottom-left origin, i.e. up
    the texture image, which is +Y of a glTF/OpenGL normal map). Per-face UV derivatives are summed
    per vertex (Lengyel's method); normal maps baked by idto3d use this same frame, so shipping it
    avoids depending on each viewer's generated tangents.
    """
    v = uv_mesh.vertices.astype(np.float64)
    t = uv_mesh.uvs.astype(np.float64)
    f = uv_mesh.faces
    e1, e2 = v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]
    d1, d2 = t[f[:, 1]] - t[f[:, 0]], t[f[:, 2]] - t[f[:, 0]]
    det = d1[:, 0] * d2[:, 1] - d2[:, 0] * d1[:, 1]
    ok = np.abs(det) > 1e-20  # faces squashed to a line in UV space carry no direction
    inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)[:, None]
    fu = (e1 * d2[:, 1:2] - e2 * d1[:, 1:2]) * inv  # dP/du
    fv = (e2 * d1[:, 0:1] - e1 * d2[:, 0:1]) * inv  # dP/dv
    tu, tv = np.zeros_like(v), np.zeros_like(v)
    for i in range(3):
        np.add.at(tu, f[:, i], fu)
        np.add.at(tv, f[:, i], fv)
    n = normals.astype(np.float64)
    tu -= n * (n * tu).sum(1, keepdims=True)
    length = np.linalg.norm(tu, axis=1, keepdims=True)
    # Fallback for vertices without a usable UV gradient: any unit vector perpendicular to n.
    helper = np.where(np.abs(n[:, :1]) < 0.9, np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]))
    alt = np.cross(n, helper)
    alt /= np.linalg.norm(alt, axis=1, keepdims=True)
    tu = np.where(length > 1e-12, tu / np.maximum(length, 1e-12), alt)
    w = np.where((np.cross(n, tu) * tv).sum(1) < 0.0, -1.0, 1.0)
    return np.concatenate([tu, w[:, None]], axis=1).astype(np.float32)
