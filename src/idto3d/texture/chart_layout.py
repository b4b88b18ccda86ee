"""UV layouts made of a few large charts: a mesh cut into parts along seams the caller chooses, each part
flattened conformally (libigl's LSCM), every chart scaled to one texel density and the charts packed in rows.

What an artist can paint on: a handful of islands, each a recognisable region of the head, with the same texels per
unit of surface everywhere. xatlas (``uv_atlas.unwrap``) is the fallback for a part that is not a disc (a handle or
a second hole in a noisy surface): it cuts that part into as many charts as it needs. The output is a ``UVMesh``
like ``uv_atlas.unwrap``'s, seam-split along the cuts, with the input's face order.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from idto3d.render.mesh import Mesh
from idto3d.texture.uv_atlas import UVMesh, cross_norm, unwrap

_MARGIN = 0.01  # around each chart, in UV units

Flatten = Callable[[np.ndarray, np.ndarray], "np.ndarray | None"]


MAX_FOLDS = 5e-3  # share of a chart's triangles LSCM may fold (flip) before the part goes to xatlas instead


def conformal_chart(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray | None:
    """LSCM UVs of a disc (two boundary vertices pinned), or None when the part is not one disc or LSCM folds
    more than ``MAX_FOLDS`` of it (a rough surface): then its texels would overlap."""
    import igl

    edges = np.sort(np.stack([faces, np.roll(faces, -1, axis=1)], axis=2).reshape(-1, 2), axis=1)
    n_boundary = int((np.unique(edges, axis=0, return_counts=True)[1] == 1).sum())
    loop = np.asarray(igl.boundary_loop(faces))
    if loop.size < 3 or loop.size != n_boundary:
        return None
    pinned = np.array([loop[0], loop[loop.size // 2]])
    result = igl.lscm(vertices, faces, pinned, np.array([[0.0, 0.0], [1.0, 0.0]]))
    uv = np.asarray(result[0] if isinstance(result, tuple) else result, dtype=np.float64)
    if uv.shape != (vertices.shape[0], 2) or not np.isfinite(uv).all():
        return None
    a, b, c = (uv[faces[:, i]] for i in range(3))
    signed = (b - a)[:, 0] * (c - a)[:, 1] - (b - a)[:, 1] * (c - a)[:, 0]
    if (signed < 0).sum() > (signed > 0).sum():  # LSCM may return the mirror image: keep the winding
        uv[:, 0], signed = -uv[:, 0], -signed
    return uv if (signed <= 0).mean() <= MAX_FOLDS else None


def _folded_share(uv: np.ndarray, faces: np.ndarray) -> float:
    """Share of the triangles whose UV winding is against the chart's majority."""
    a, b, c = (uv[faces[:, i]] for i in range(3))
    signed = (b - a)[:, 0] * (c - a)[:, 1] - (b - a)[:, 1] * (c - a)[:, 0]
    return float(min((signed <= 0).sum(), (signed >= 0).sum()) / max(signed.size, 1))


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


def smooth_parts(f: np.ndarray, part: np.ndarray, rounds: int = 4) -> np.ndarray:
    """``part`` (a label per face) with every face whose edge neighbours mostly carry another label moved to it,
    so seams run along edges without teeth, then every stray piece of a part merged into its neighbours, so each
    part is one piece (one chart)."""
    nb = _edge_neighbours(f)
    labels_k = np.unique(part)
    for _ in range(rounds):
        labels = np.where(nb >= 0, part[np.maximum(nb, 0)], -1)
        votes = np.stack([(labels == k).sum(1) for k in labels_k], axis=1)
        part = np.where(votes.max(1) >= 2, labels_k[votes.argmax(1)], part)
    return _absorb_strays(f, nb, part)


def _absorb_strays(f: np.ndarray, nb: np.ndarray, part: np.ndarray) -> np.ndarray:
    """``part`` with each piece of a label but its largest relabelled to the label it shares most edges with.

    Where three seams meet, a face (or two) can keep a label none of its neighbours has a majority of; it would
    be a chart of its own, a sliver an artist cannot paint on. Which faces that strands depends on the last bits
    of the vertex positions, so the chart count would vary between machines."""
    part = part.copy()
    for _ in range(8):  # a relabelled piece can join another stray: a few passes settle it
        piece = _components(f, nb, part)
        ids, first = np.unique(piece, return_index=True)
        label, size = part[first], np.bincount(piece)[ids]
        by_label = np.lexsort((-size, label))  # per label, its largest piece first
        keep = by_label[np.r_[True, label[by_label][1:] != label[by_label][:-1]]]
        strays = np.setdiff1d(ids, ids[keep])
        if strays.size == 0:
            return part
        for p in strays:
            faces = np.flatnonzero(piece == p)
            around = nb[faces].reshape(-1)
            around = around[(around >= 0) & (piece[np.maximum(around, 0)] != p)]
            if around.size:
                values, counts = np.unique(part[around], return_counts=True)
                part[faces] = values[counts.argmax()]
    return part


def _components(f: np.ndarray, nb: np.ndarray | None = None, part: np.ndarray | None = None) -> np.ndarray:
    """The edge-connected piece of each face (``nb``: ``_edge_neighbours(f)``, when at hand); with ``part``,
    faces join only neighbours of their own label."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nb = _edge_neighbours(f) if nb is None else nb
    rows = np.repeat(np.arange(f.shape[0]), 3)
    cols = nb.reshape(-1)
    ok = cols >= 0
    if part is not None:
        ok &= part[rows] == part[np.maximum(cols, 0)]
    graph = coo_matrix((np.ones(int(ok.sum())), (rows[ok], cols[ok])), shape=(f.shape[0],) * 2)
    return connected_components(graph, directed=False)[1]


def layout_parts(v: np.ndarray, f: np.ndarray, part: np.ndarray,
                 flatten: dict[int, Flatten] | None = None) -> UVMesh:
    """The UV layout of mesh ``(v, f)`` cut into ``part`` (a label per face): each edge-connected piece of a part
    is one chart, flattened by ``flatten[label]`` when given (a projection the caller knows is fold-free) or by
    LSCM (also when the caller's projection folds more than ``MAX_FOLDS`` of the piece), and by xatlas when
    neither can (not a disc); all at one texel density, packed into the unit square."""
    flatten = flatten or {}
    maps, faces, uvs, order = [], [], [], []
    offset = 0
    for label in np.unique(part):
        in_part = np.flatnonzero(part == label)
        pieces = _components(f[in_part]) if label not in flatten else np.zeros(in_part.size, np.int64)
        for piece in np.unique(pieces):
            sel = in_part[pieces == piece]
            ids = np.unique(f[sel])
            local = np.searchsorted(ids, f[sel])
            uv = flatten[label](v[ids], local) if label in flatten else None
            if uv is not None and _folded_share(uv, local) > MAX_FOLDS:  # e.g. a mouth cavity behind the face
                uv = None
            if uv is None:
                uv = conformal_chart(v[ids], local)
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


FRONT = 0.35       # the face chart: faces in front of this share of the head's half-depth (nose side, +z)
NECK_SHARE = 0.3   # the faces below the neck seam


def head_parts(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Parts of a head in the working space (+y up, facing +z): the face (4) in front, and the rest cut by a seam
    down the middle of the back and over the crown and one around the neck: left/right (0/1) neck or head (+2)."""
    c = v[f].mean(1)
    lo, hi = v.min(0), v.max(0)
    mid = (lo + hi) / 2
    neck = c[:, 1] <= np.percentile(c[:, 1], 100 * NECK_SHARE)
    front = (c[:, 2] - mid[2] > FRONT * (hi[2] - mid[2])) & ~neck
    part = np.where(front, 4, (c[:, 0] > mid[0]).astype(np.int64) + 2 * (~neck))
    return smooth_parts(f, part)


def head_layout(mesh: Mesh) -> UVMesh:
    """A few-chart layout of a closed head mesh (``head_parts``), e.g. one extracted from the DMTet grid."""
    v = mesh.vertices.detach().double().cpu().numpy()
    f = mesh.faces.detach().cpu().numpy().astype(np.int64)
    return layout_parts(v, f, head_parts(v, f))
