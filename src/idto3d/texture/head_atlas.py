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
from idto3d.texture.uv_atlas import UVMesh, cross_norm, unwrap

NECK_SHARE = 0.3  # of the non-face faces below the neck seam: the neck and its cap, up to under the jaw
_MARGIN = 0.01    # around each chart, in UV units


def _face_chart(vertices: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """``[V, 2]`` UVs of the face: longitude and latitude seen from ``centre`` (behind the face), the projection
    the face model's own triangulation was made in, so the chart has (next to) no folds."""
    d = vertices - centre
    return np.stack([np.arctan2(d[:, 0], d[:, 2]), np.arctan2(d[:, 1], np.hypot(d[:, 0], d[:, 2]))], axis=1)


def _conformal_chart(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray | None:
    """LSCM UVs of a disc (two boundary vertices pinned), or None when the part is not one disc."""
    import igl

    edges = np.sort(np.stack([faces, np.roll(faces, -1, axis=1)], axis=2).reshape(-1, 2), axis=1)
    n_boundary = int((np.unique(edges, axis=0, return_counts=True)[1] == 1).sum())
    loop = np.asarray(igl.boundary_loop(faces))
    if loop.size < 3 or loop.size != n_boundary:
        return None
    pinned = np.array([loop[0], loop[loop.size // 2]])
    result = igl.lscm(vertices, faces, pinned, np.array([[0.0, 0.0], [1.0, 0.0]]))
    uv = np.asarray(result[0] if isinstance(result, tuple) else result, dtype=np.float64)
    return uv if uv.shape == (vertices.shape[0], 2) and np.isfinite(uv).all() else None


def _xatlas_charts(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rest = unwrap(Mesh(torch.from_numpy(vertices).float(), torch.from_numpy(faces)))
    return rest.vmapping, rest.faces, rest.uvs.astype(np.float64)


def _area(p: np.ndarray, f: np.ndarray) -> float:
    a, b, c = (p[f[:, i]] for i in range(3))
    return float(0.5 * cross_norm(b - a, c - a).sum())


def _unit_density(uv: np.ndarray, v: np.ndarray, f: np.ndarray) -> np.ndarray:
    """``uv`` scaled so a unit of surface gets a unit of UV area, and turned so its long side lies along u
    (tighter boxes when packing)."""
    uv = uv - uv.mean(0)
    _, _, axes = np.linalg.svd(uv, full_matrices=False)
    uv = uv @ axes.T
    if np.linalg.det(axes) < 0:  # a reflection would flip the chart's winding
        uv[:, 1] = -uv[:, 1]
    return uv * np.sqrt(_area(v, f) / max(_area(uv, f), 1e-30))


def _shelves(size: list[np.ndarray], width: float, gap: float) -> tuple[list[np.ndarray], float]:
    """Corners of boxes ``size`` placed in rows of at most ``width``, tallest first, and the square's side."""
    corner: list[np.ndarray] = [np.zeros(2)] * len(size)
    x = y = row_h = used_w = 0.0
    for i in sorted(range(len(size)), key=lambda i: -size[i][1]):
        if x > 0 and x + size[i][0] > width:
            x, y, row_h = 0.0, y + row_h + gap, 0.0
        corner[i] = np.array([x, y])
        used_w = max(used_w, x + float(size[i][0]))
        x, row_h = x + float(size[i][0]) + gap, max(row_h, float(size[i][1]))
    return corner, max(used_w, y + row_h)


def _pack(charts: list[np.ndarray]) -> list[np.ndarray]:
    """The charts (same density) placed in rows, tallest first, on the row width (of 64 tried) that needs the
    smallest square, then scaled uniformly into the unit square."""
    size = [c.max(0) - c.min(0) for c in charts]
    gap = 2 * _MARGIN * np.sqrt(sum(float(s.prod()) for s in size))
    widths = np.linspace(max(float(s[0]) for s in size), sum(float(s[0]) + gap for s in size), 64)
    corner, extent = min((_shelves(size, float(w), gap) for w in widths), key=lambda r: r[1])
    scale = (1.0 - 2 * _MARGIN) / extent
    return [(c - c.min(0) + o) * scale + _MARGIN for c, o in zip(charts, corner)]


def _edge_neighbours(f: np.ndarray) -> np.ndarray:
    """``[F, 3]``: the face across each edge (-1 on a boundary; an arbitrary one on a non-manifold edge)."""
    e = np.sort(np.stack([f, np.roll(f, -1, axis=1)], axis=2).reshape(-1, 2), axis=1)
    _, inverse = np.unique(e, axis=0, return_inverse=True)
    order = np.argsort(inverse.reshape(-1), kind="stable")
    inv = inverse.reshape(-1)[order]
    out = np.full(e.shape[0], -1, np.int64)
    pair = np.flatnonzero(inv[1:] == inv[:-1])
    out[order[pair]], out[order[pair + 1]] = order[pair + 1] // 3, order[pair] // 3
    return out.reshape(-1, 3)


def _rest_parts(v: np.ndarray, f: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Part 0-3 of each non-face face: left/right of the sagittal plane, neck (below the seam) or head. A face
    whose edge neighbours mostly lie in another part joins it (a few rounds), so the seams run along edges
    without teeth and every part stays one disc."""
    c = v[f].mean(1)
    neck = c[:, 1] <= np.percentile(c[:, 1], 100 * NECK_SHARE)
    part = (c[:, 0] > centre[0]).astype(np.int64) + 2 * (~neck)
    nb = _edge_neighbours(f)
    for _ in range(4):
        labels = np.where(nb >= 0, part[np.maximum(nb, 0)], -1)
        votes = np.stack([(labels == k).sum(1) for k in range(4)], axis=1)
        part = np.where(votes.max(1) >= 2, votes.argmax(1), part)
    return part


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
    maps, faces, uvs, order = [], [], [], []
    offset = 0
    for k in range(5):
        sel = np.flatnonzero(part == k)
        if sel.size == 0:
            continue
        ids = np.unique(f[sel])
        local = np.searchsorted(ids, f[sel])
        uv = _face_chart(v[ids], centre) if k == 4 else _conformal_chart(v[ids], local)
        if uv is None:  # not a disc: let xatlas cut it
            mapping, local, uv = _xatlas_charts(v[ids], local)
            ids = ids[mapping]
        maps.append(ids)
        faces.append(local + offset)
        uvs.append(_unit_density(uv, v[ids], local))
        order.append(sel)
        offset += ids.size
    vmapping = np.concatenate(maps).astype(np.int64)
    out_faces = np.empty_like(f)
    out_faces[np.concatenate(order)] = np.concatenate(faces)
    packed = np.clip(np.concatenate(_pack(uvs)), 0.0, 1.0).astype(np.float32)
    return UVMesh(v[vmapping].astype(np.float32), out_faces, packed, vmapping)


def chart_centre(nose_tip: torch.Tensor, depth: float = 0.8) -> np.ndarray:
    """The point the face chart is seen from: ``depth`` units (16 cm) behind the nose tip, at its height."""
    c = nose_tip.detach().double().cpu().numpy().copy()
    c[2] -= depth
    return c
