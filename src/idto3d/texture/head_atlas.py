"""The UV layout of the stitched offline head (``geometry.head_stitch``): one chart for the face, xatlas for
the rest.

xatlas charts a 100k-triangle face in about a minute on two cores (it grows many small charts on the face's
dense, curved surface), while the face is a disc that its longitude and latitude, seen from a point behind it,
flatten at once (the 3DDFA triangulation was made in that projection: about 40 of 69k triangles fold, in the
nostrils, where the model's mesh itself folds). So the face gets that single chart, in the left ``FACE_SHARE`` of the square (scaled
uniformly: it is where the detail is), and the smooth, coarse rest of the head (body and zipper) is unwrapped by
xatlas and scaled into the remaining strip. The result is a ``UVMesh`` like ``uv_atlas.unwrap``'s, seam-split
along the face's cut, in the stitched head's face order.
"""

from __future__ import annotations

import numpy as np
import torch

from idto3d.geometry.head_stitch import StitchedHead
from idto3d.render.mesh import Mesh
from idto3d.texture.uv_atlas import UVMesh, unwrap

FACE_SHARE = 0.55  # of the atlas width given to the face chart
_MARGIN = 0.01     # around each part, in UV units


def _face_chart(vertices: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """``[V, 2]`` UVs of the face: longitude and latitude seen from ``centre`` (behind the face), the projection
    the face model's own triangulation was made in, so the chart has (next to) no folds."""
    d = vertices - centre
    return np.stack([np.arctan2(d[:, 0], d[:, 2]), np.arctan2(d[:, 1], np.hypot(d[:, 0], d[:, 2]))], axis=1)


def _fit_box(uv: np.ndarray, x0: float, x1: float, uniform: bool) -> np.ndarray:
    """``uv`` scaled (uniformly, or per axis) and moved into ``[x0, x1] x [0, 1]`` minus the margin."""
    lo, hi = uv.min(0), uv.max(0)
    span = np.maximum(hi - lo, 1e-12)
    box = np.array([x1 - x0 - 2 * _MARGIN, 1.0 - 2 * _MARGIN])
    scale = np.full(2, (box / span).min()) if uniform else box / span
    out = (uv - lo) * scale
    out += (box - span * scale) / 2 + np.array([x0 + _MARGIN, _MARGIN])
    return out


def stitched_atlas(head: Mesh, layout: StitchedHead, centre: np.ndarray | torch.Tensor) -> UVMesh:
    """The UV layout of a stitched head (any of its expressions: they share the topology); ``centre``: the
    point behind the face that its chart is seen from (``chart_centre``)."""
    v = head.vertices.detach().double().cpu().numpy()
    f = head.faces.cpu().numpy().astype(np.int64)
    split = layout.n_body_faces + layout.n_bridge_faces
    parts = []
    for part_faces, face_part in ((f[:split], False), (f[split:], True)):
        ids = np.unique(part_faces)
        local = np.searchsorted(ids, part_faces)
        if face_part:
            uv = _fit_box(_face_chart(v[ids], np.asarray(centre, dtype=np.float64)), 0.0, FACE_SHARE, uniform=True)
            parts.append((ids, local, uv))
        else:
            rest = unwrap(Mesh(torch.from_numpy(v[ids]).float(), torch.from_numpy(local)))
            uv = _fit_box(rest.uvs.astype(np.float64), FACE_SHARE, 1.0, uniform=False)
            parts.append((ids[rest.vmapping], rest.faces, uv))
    (m_a, f_a, uv_a), (m_b, f_b, uv_b) = parts
    vmapping = np.concatenate([m_a, m_b]).astype(np.int64)
    faces = np.concatenate([f_a, f_b + m_a.shape[0]]).astype(np.int64)
    uvs = np.clip(np.concatenate([uv_a, uv_b]), 0.0, 1.0).astype(np.float32)
    return UVMesh(v[vmapping].astype(np.float32), faces, uvs, vmapping)


def chart_centre(nose_tip: torch.Tensor, depth: float = 0.8) -> np.ndarray:
    """The point the face chart is seen from: ``depth`` units (16 cm) behind the nose tip, at its height."""
    c = nose_tip.detach().double().cpu().numpy().copy()
    c[2] -= depth
    return c
