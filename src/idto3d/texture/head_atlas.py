"""The UV layout of the stitched offline head (``geometry.head_stitch``): five large charts at one texel density.

An artist paints on a few large islands, not on the ~80 small ones xatlas cuts the smooth body into. So the head is
cut by hand where nobody looks: the face is one chart (its longitude and latitude seen from a point behind it, the
projection the 3DDFA triangulation was made in, so it has next to no folds); the rest (the back of the head, the
neck and its cap, topologically a disc around the face's cut) is cut by a seam down the middle of the back and
over the crown (the sagittal plane through the nose) and one around the neck (``NECK_SHARE``), into four discs
that are flattened conformally (libigl's LSCM). Every chart is then scaled to the same texels per unit of surface
(so the map is not wasted on the neck) and the five are packed in rows into the square. A part that is not a disc
(a stitch gone wrong) falls back to xatlas. The result is a ``UVMesh`` like ``uv_atlas.unwrap``'s, seam-split
along the cuts, in the stitched head's face order.
"""

from __future__ import annotations

import numpy as np
import torch

from idto3d.geometry.head_stitch import StitchedHead
from idto3d.geometry.mesh_clean import CleanSelection
from idto3d.render.mesh import Mesh
from idto3d.texture.chart_layout import layout_parts, smooth_parts
from idto3d.texture.uv_atlas import UVMesh

NECK_SHARE = 0.3  # of the non-face faces below the neck seam: the neck and its cap, up to under the jaw


def _face_chart(vertices: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """``[V, 2]`` UVs of the face: longitude and latitude seen from ``centre`` (behind the face), the projection
    the face model's own triangulation was made in, so the chart has (next to) no folds."""
    d = vertices - centre
    return np.stack([np.arctan2(d[:, 0], d[:, 2]), np.arctan2(d[:, 1], np.hypot(d[:, 0], d[:, 2]))], axis=1)


def _rest_parts(v: np.ndarray, f: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Part 0-3 of each non-face face: left/right of the sagittal plane, neck (below the seam) or head."""
    c = v[f].mean(1)
    neck = c[:, 1] <= np.percentile(c[:, 1], 100 * NECK_SHARE)
    return smooth_parts(f, (c[:, 0] > centre[0]).astype(np.int64) + 2 * (~neck))


def stitched_atlas(head: Mesh, layout: StitchedHead, centre: np.ndarray | torch.Tensor,
                   cleaned: CleanSelection | None = None) -> UVMesh:
    """The UV layout of a stitched head (any of its expressions: they share the topology); ``centre``: the
    point behind the face that its chart is seen from (``chart_centre``); ``cleaned``: the repair that made
    ``head`` from the stitched one (``geometry.mesh_clean``), if any (it tells which faces are the face's)."""
    v = head.vertices.detach().double().cpu().numpy()
    f = head.faces.cpu().numpy().astype(np.int64)
    centre = np.asarray(centre, dtype=np.float64)
    split = layout.n_body_faces + layout.n_bridge_faces
    source = cleaned.face_source if cleaned is not None else np.arange(f.shape[0])
    on_face = source >= split  # hole fills (-1) go with the rest
    part = np.full(f.shape[0], 4)
    part[~on_face] = _rest_parts(v, f[~on_face], centre)
    return layout_parts(v, f, part, {4: lambda vertices, _: _face_chart(vertices, centre)})


def chart_centre(nose_tip: torch.Tensor, depth: float = 0.8) -> np.ndarray:
    """The point the face chart is seen from: ``depth`` units (16 cm) behind the nose tip, at its height."""
    c = nose_tip.detach().double().cpu().numpy().copy()
    c[2] -= depth
    return c
