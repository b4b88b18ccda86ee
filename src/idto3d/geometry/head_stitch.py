"""The offline head at full resolution: the fitted face mesh itself, stitched into a smooth head body.

``face_merge.merge_face`` pulls the template's front onto the face, which keeps the template's resolution (and the
geometry field's remesh, grid 48, kept even less). Here the face keeps every vertex of the face model and the body
(the merged template, decimated to a smooth coarse mesh) supplies the rest of the head:

* the body's vertices whose closest face point lies inside the face mask (the mask's border falloff at or above
  ``BODY_MARGIN * cut``) are cut out, leaving one hole; the face keeps the part of its mask above ``cut``, so
  the body's border runs outside the face's all round;
* the face's outer band is blended onto the body (``v -> c + s (v - c)``, ``c`` its closest body point, ``s`` a
  smoothstep of the falloff from ``cut`` to 1), so the face's cut edge lies on the body: no step at the border;
* the gap between the two loops is closed by a zipper of triangles that folds nowhere: the loops' concave
  corners filled first, the two loops walked in the order the body's vertices project onto the face's, the
  diagonals of any folding pair flipped; oriented so every edge of the result is shared by two faces in opposite
  directions: one closed, manifold surface without self-intersections at the seam.

The layout (which vertices stay, the zipper) is built once from the neutral expression and reused for every
expression (:func:`pose_head`), so all expressions share one topology, one UV layout and the face model's vertex
indices (``face_vertices``: the landmarks of the face model can be found in every export).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from idto3d.core.errors import IdtoError
from idto3d.render.mesh import Mesh

CUT = 0.35  # border-falloff level where the face meets the body
BODY_MARGIN = 0.7  # the body's opening is cut at this fraction of the face's cut level: outside the face's border
BODY_NOTCH = 0.1  # working units (2 cm): the widest concave corner of the body's opening that is filled
NOTCH = 0.03  # working units (6 mm): the widest concave corner of the face's cut that is filled before zipping
# Corners turning by less (the sine of ~12 degrees) stay: their fill is a sliver so flat that another expression's
# band, projected onto its body, slides over it.
NOTCH_TURN = 0.2


@dataclass(frozen=True)
class StitchedHead:
    """The stitched head's topology: ``vertices = [body[body_vertices]; face[face_vertices]]``."""

    body_vertices: np.ndarray   # [B] indices into the body mesh
    face_vertices: np.ndarray   # [K] indices into the face model's vertices
    faces: np.ndarray           # [F, 3] into the stitched vertices, counter-clockwise from outside
    n_body_faces: int           # faces[:n_body_faces] are the body's, then the zipper's, then the face's
    n_bridge_faces: int
    blend: np.ndarray           # [K] how much each kept face vertex keeps the face (0 = on the body, 1 = face)

    @property
    def n_body(self) -> int:
        return int(self.body_vertices.shape[0])


def _face_adjacency_components(faces: np.ndarray, n_vertices: int) -> np.ndarray:
    """Connected component label of every face (faces sharing an edge)."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    f = faces.shape[0]
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    key = edges[:, 0].astype(np.int64) * n_vertices + edges[:, 1]
    owner = np.tile(np.arange(f), 3)
    order = np.argsort(key, kind="stable")
    same = key[order][1:] == key[order][:-1]
    a, b = owner[order][1:][same], owner[order][:-1][same]
    graph = sp.coo_matrix((np.ones(a.size), (a, b)), shape=(f, f))
    return connected_components(graph, directed=False)[1]


def _largest_part(faces: np.ndarray, n_vertices: int) -> np.ndarray:
    """Mask of the faces in the largest edge-connected component."""
    if faces.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    label = _face_adjacency_components(faces, n_vertices)
    return label == np.bincount(label).argmax()


def _boundary_edges(faces: np.ndarray) -> np.ndarray:
    """Directed boundary edges ``[E, 2]`` (as the faces traverse them)."""
    directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    und = np.sort(directed, axis=1)
    _, inverse, counts = np.unique(und, axis=0, return_inverse=True, return_counts=True)
    return directed[counts[inverse.reshape(-1)] == 1]


def _clean_disc(keep: np.ndarray, faces: np.ndarray, n_vertices: int, drop_vertices_with_many: bool = True
                ) -> np.ndarray:
    """``keep`` (face mask) trimmed until the kept part is one piece whose border is one simple loop."""
    keep = keep.copy()
    for _ in range(20):
        idx = np.nonzero(keep)[0]
        part = _largest_part(faces[idx], n_vertices)
        keep[:] = False
        keep[idx[part]] = True
        # The removed part must be one piece too (one hole): keep back every removed piece but the largest.
        removed = np.nonzero(~keep)[0]
        if removed.size:
            part = _largest_part(faces[removed], n_vertices)
            keep[removed[~part]] = True
        edges = _boundary_edges(faces[keep])
        count = np.bincount(edges[:, 0], minlength=n_vertices)
        pinched = np.nonzero(count > 1)[0]
        if pinched.size == 0:
            return keep
        # A vertex the border passes twice: drop the kept faces around it and look again.
        keep &= ~np.isin(faces, pinched).any(1)
    raise IdtoError("could not cut a clean opening for the face into the head body")


def _loop(edges: np.ndarray) -> np.ndarray:
    """The vertices of one closed loop of directed edges, in order."""
    nxt = dict(zip(edges[:, 0].tolist(), edges[:, 1].tolist()))
    start = int(edges[0, 0])
    out = [start]
    v = nxt[start]
    while v != start:
        out.append(v)
        v = nxt[v]
        if len(out) > len(nxt):
            raise IdtoError("the border of the face cut is not a simple loop")
    if len(out) != len(nxt):
        raise IdtoError(f"the face cut has {len(nxt)} border edges but its loop only {len(out)}: several loops")
    return np.asarray(out, dtype=np.int64)


def _signed_area(points: np.ndarray, normal: np.ndarray) -> float:
    """Area of a closed polygon ``[N, 3]`` projected along ``normal`` (its sign: the winding about it)."""
    nxt = np.roll(points, -1, axis=0)
    return float(0.5 * (np.cross(points, nxt) @ normal).sum())


def _zipper(inner: np.ndarray, outer: np.ndarray, pos: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Triangles between two loops that wind the same way (vertex ids into ``pos``; ``normals`` the surface's
    there). ``inner`` is the face's loop as its faces traverse it; ``outer`` runs against the body's. Each step
    adds the triangle that advances one loop: one that faces out with the surface (a triangle facing in folds
    back over its neighbours), the shorter diagonal first when both do."""
    t_in = _arc_fraction(pos[inner])
    t_out = _projected_fraction(pos[outer], pos[inner], t_in)
    start = int(np.argmin(t_out))
    outer, t_out = np.roll(outer, -start), np.roll(t_out, -start)
    # Each body vertex takes its place along the face's loop where it lies closest to it, kept in order (a body
    # vertex whose nearest face point lies behind its predecessor's joins that place).
    t_out = np.concatenate([np.maximum.accumulate(t_out), [1.0]])
    n, m = inner.size, outer.size
    i = j = 0
    tris = []
    while i < n or j < m:
        a0, a1 = inner[i % n], inner[(i + 1) % n]
        b0, b1 = outer[j % m], outer[(j + 1) % m]
        if j >= m:
            advance_inner = True
        elif i >= n:
            advance_inner = False
        else:
            up = normals[a0] + normals[b0]
            faces_out = (_facing(pos, (a1, a0, b0), up), _facing(pos, (b0, b1, a0), up))
            behind = t_in[i + 1] <= t_out[j + 1]
            advance_inner = behind if faces_out[0] == faces_out[1] else faces_out[0]
        if advance_inner:
            tris.append((a1, a0, b0))  # the face has a0 -> a1, so this triangle has a1 -> a0
            i += 1
        else:
            tris.append((b0, b1, a0))  # the body has b1 -> b0 (outer runs against it)
            j += 1
    return np.asarray(tris, dtype=np.int64)


def _fill_notches(loop: np.ndarray, other: np.ndarray, pos: np.ndarray, normals: np.ndarray, widest: float,
                  around: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``loop`` (its surface on its left about ``normals``) with its concave corners filled: where it turns right
    by more than ``NOTCH_TURN`` (a step of the face's triangle staircase), the triangle over the corner is added, until none is left that is
    narrower than the gap to the ``other`` loop. A corner the other loop's fan would see from behind would fold a
    zipper triangle back over the surface. Returns the filled loop and the added triangles (the surface's
    winding). ``around``: the surface's faces (a chord that is already one of their edges is not filled: that
    edge would have three faces)."""
    taken = _edges_among(around, loop)
    seg_a, seg_b = pos[other], pos[np.roll(other, -1)]
    gap = np.array([_segment_distance(pos[v], seg_a, seg_b) for v in loop])
    ring, width, tris = list(loop), list(gap), []
    changed = True
    while changed and len(ring) > 3:
        changed = False
        k = 0
        while k < len(ring) and len(ring) > 3:
            prev, cur, nxt = ring[k - 1], ring[k], ring[(k + 1) % len(ring)]
            u, w = pos[cur] - pos[prev], pos[nxt] - pos[cur]
            turn = np.cross(u, w) @ normals[cur] / max(np.linalg.norm(u) * np.linalg.norm(w), 1e-20)
            if (turn < -NOTCH_TURN and np.linalg.norm(pos[nxt] - pos[prev]) < min(width[k], widest)
                    and (min(prev, nxt), max(prev, nxt)) not in taken):
                tris.append((nxt, cur, prev))
                del ring[k], width[k]
                changed = True
            else:
                k += 1
    return np.asarray(ring, dtype=np.int64), np.asarray(tris, dtype=np.int64).reshape(-1, 3)


def _edges_among(faces: np.ndarray, vertices: np.ndarray) -> set[tuple[int, int]]:
    """The edges ``(low, high)`` of ``faces`` with both ends in ``vertices``."""
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    return {tuple(e) for e in edges[np.isin(edges, vertices).all(1)].tolist()}


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """The distance from ``p`` to the nearest of the segments ``a[i] b[i]``."""
    ab = b - a
    t = np.clip(((p - a) * ab).sum(1) / np.maximum((ab * ab).sum(1), 1e-20), 0.0, 1.0)
    return float(np.linalg.norm(a + t[:, None] * ab - p, axis=1).min())


def _arc_fraction(points: np.ndarray) -> np.ndarray:
    """``[N + 1]``: how far along the closed polygon ``points`` each vertex lies (0 to 1, the start repeated)."""
    step = np.linalg.norm(np.roll(points, -1, axis=0) - points, axis=1)
    return np.concatenate([[0.0], np.cumsum(step)]) / step.sum()


def _projected_fraction(points: np.ndarray, loop: np.ndarray, t_loop: np.ndarray) -> np.ndarray:
    """``[N]``: for each of ``points``, how far along the closed polygon ``loop`` (its vertices at ``t_loop``,
    :func:`_arc_fraction`) its closest point lies."""
    a, b = loop, np.roll(loop, -1, axis=0)
    ab = b - a
    out = np.empty(len(points))
    for k, p in enumerate(points):
        t = np.clip(((p - a) * ab).sum(1) / np.maximum((ab * ab).sum(1), 1e-20), 0.0, 1.0)
        e = int(np.argmin(np.linalg.norm(a + t[:, None] * ab - p, axis=1)))
        out[k] = t_loop[e] + t[e] * (t_loop[e + 1] - t_loop[e])
    return out


def _unfold(tris: np.ndarray, pos: np.ndarray, normals: np.ndarray, around: np.ndarray, rounds: int = 20
            ) -> np.ndarray:
    """``tris`` (the zipper) with the diagonal of every two of its triangles flipped where one of them faces
    into the surface and both face out after the flip (the quad they make is convex there): the zipper's
    folds undone, its border and topology (a disc strip) unchanged. ``around``: the faces it closes the gap
    between (a new diagonal must not be one of their edges: that edge would have three faces)."""
    tris = tris.copy()
    edges_around = _edges_among(around, np.unique(tris))
    for _ in range(rounds):
        flipped = False
        edges = {}
        for k, t in enumerate(tris):
            for e in range(3):
                edges.setdefault((int(t[e]), int(t[(e + 1) % 3])), k)
        existing = {tuple(sorted(e)) for e in edges} | edges_around
        for k in range(len(tris)):
            t = tris[k]
            if _facing(pos, tuple(t), normals[t].sum(0)):
                continue
            for e in range(3):
                a, b, c = int(t[e]), int(t[(e + 1) % 3]), int(t[(e + 2) % 3])
                other = edges.get((b, a))
                if other is None or other == k:
                    continue
                d = int(next(x for x in tris[other] if x not in (a, b)))
                if tuple(sorted((c, d))) in existing:
                    continue
                new1, new2 = (c, a, d), (d, b, c)
                if _facing(pos, new1, normals[list(new1)].sum(0)) and _facing(pos, new2, normals[list(new2)].sum(0)):
                    tris[k], tris[other] = new1, new2
                    flipped = True
                    break
            if flipped:
                break
        if not flipped:
            return tris
    return tris


def _facing(pos: np.ndarray, tri: tuple, up: np.ndarray) -> bool:
    """Whether the triangle ``tri`` (ids into ``pos``) faces along ``up``."""
    p0, p1, p2 = pos[list(tri)]
    return float(np.cross(p1 - p0, p2 - p0) @ up) > 0.0


def _vertex_normals(pos: np.ndarray, faces: np.ndarray) -> np.ndarray:
    import igl

    return np.asarray(igl.per_vertex_normals(pos, faces, igl.PER_VERTEX_NORMALS_WEIGHTING_TYPE_AREA))


def _closest(points: np.ndarray, mesh_v: np.ndarray, mesh_f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import igl

    d2, fid, c = igl.point_mesh_squared_distance(points, mesh_v, mesh_f)
    return np.sqrt(d2), fid, c


def build_stitched_head(body: Mesh, face: Mesh, falloff: torch.Tensor, *, cut: float = CUT,
                        reach: float = 0.25) -> StitchedHead:
    """The layout of the face (placed, neutral) stitched into ``body`` (the closed head, already merged with
    the face). ``falloff [V_face]``: ``face_merge.border_falloff`` of the face (0 on its border, 1 inside)."""
    bv = body.vertices.detach().double().cpu().numpy()
    bf = body.faces.cpu().numpy().astype(np.int64)
    fv = face.vertices.detach().double().cpu().numpy()
    ff = face.faces.cpu().numpy().astype(np.int64)
    w = falloff.double().cpu().numpy()
    # Body vertices under the face's inner part go; what the face's mask does not reach stays.
    # The body's opening reaches past the face's cut (a lower falloff level), so the body's border runs outside
    # the face's all round: cut at the same level, the two borders crossed each other along parts of the seam and
    # the zipper between them folded back over the face.
    covered, _ = _covered(bv, face, falloff, cut * BODY_MARGIN, reach)
    body_keep = _clean_disc(~covered[bf].any(1), bf, bv.shape[0])
    face_keep = _clean_disc((w[ff] >= cut).all(1), ff, fv.shape[0])
    body_faces, face_faces = bf[body_keep], ff[face_keep]
    body_ids = np.unique(body_faces)
    face_ids = np.unique(face_faces)
    remap_b = np.full(bv.shape[0], -1, np.int64)
    remap_b[body_ids] = np.arange(body_ids.size)
    remap_f = np.full(fv.shape[0], -1, np.int64)
    remap_f[face_ids] = body_ids.size + np.arange(face_ids.size)
    body_faces, face_faces = remap_b[body_faces], remap_f[face_faces]
    pos = np.concatenate([bv[body_ids], fv[face_ids]])
    inner = _loop(_boundary_edges(face_faces))
    outer = _loop(_boundary_edges(body_faces))[::-1]  # against the body's own direction
    normal = np.linalg.svd(pos[inner] - pos[inner].mean(0))[2][2]
    if _signed_area(pos[inner], normal) * _signed_area(pos[outer], normal) < 0:
        raise IdtoError("the face's border and the body's opening wind opposite ways; the face is not on the body")
    around = np.concatenate([body_faces, face_faces])
    normals = _vertex_normals(pos, around)
    seam = inner
    inner, filled = _fill_notches(inner, outer, pos, normals, NOTCH, around)
    outer, body_filled = _fill_notches(outer[::-1], inner, pos, normals, BODY_NOTCH, around)
    outer = outer[::-1]
    bridge = _unfold(np.concatenate([filled, body_filled, _zipper(inner, outer, pos, normals)]), pos, normals,
                     around)
    blend = np.clip((w[face_ids] - cut) / (1.0 - cut), 0.0, 1.0)
    blend[seam - body_ids.size] = 0.0  # the cut edge itself lies on the body
    return StitchedHead(body_ids, face_ids, np.concatenate([body_faces, bridge, face_faces]),
                        n_body_faces=body_faces.shape[0], n_bridge_faces=bridge.shape[0],
                        blend=blend * blend * (3 - 2 * blend))


def pose_head(layout: StitchedHead, body: Mesh, face_vertices: torch.Tensor) -> Mesh:
    """The stitched head for one expression: ``body`` (merged with this expression's face) and the face's
    vertices ``[V_face, 3]``, its outer band blended onto the body."""
    bv = body.vertices.detach().double().cpu().numpy()
    bf = body.faces.cpu().numpy().astype(np.int64)
    fv = face_vertices.detach().double().cpu().numpy()[layout.face_vertices]
    _, _, on_body = _closest(fv, bv, bf)
    s = layout.blend[:, None]
    face = on_body + s * (fv - on_body)
    verts = np.concatenate([bv[layout.body_vertices], face])
    return Mesh(torch.from_numpy(verts).float(), torch.from_numpy(layout.faces))


def conform_body(body: Mesh, face: Mesh, falloff: torch.Tensor, *, cut: float = CUT, reach: float = 0.25,
                 radius: float = 0.3, rest: Mesh | None = None) -> Mesh:
    """``body`` bent onto the face: the vertices under the face's inner part (falloff >= ``cut``) go to their
    closest face points, those farther than ``radius`` from them stay, and the rest follow a biharmonic
    interpolation of those displacements (``igl.harmonic``, k = 2): smooth up to the cut, so the stitch has no
    step. The body keeps its topology. ``rest``: the neutral face (``face``'s topology); the body's vertices are
    bound to it (which go, and to which point of which face triangle) and follow those points on ``face``, so
    every expression bends the same body vertices the same way and the body moves with the face. Bound afresh
    on each expression, a jaw dropping over the neck took body vertices the neutral's layout keeps onto the
    face, under its band: the two crossed."""
    import igl
    from scipy.spatial import cKDTree

    bv = body.vertices.detach().double().cpu().numpy()
    bf = body.faces.cpu().numpy().astype(np.int64)
    covered, closest = _covered(bv, face if rest is None else rest, falloff, cut, reach)
    if not covered.any():
        raise IdtoError("the fitted face does not lie on the head body; it cannot be stitched in")
    far = cKDTree(bv[covered]).query(bv, k=1)[0] > radius
    if rest is not None:
        closest = _transport(closest, rest, face)
    b = np.nonzero(covered | far)[0]
    bc = np.where(covered[b, None], closest[b] - bv[b], 0.0)
    disp = igl.harmonic(bv, bf, b.astype(np.int64), bc, 2)
    return Mesh(torch.from_numpy(bv + np.asarray(disp)).float(), body.faces.clone())


def _transport(points: np.ndarray, rest: Mesh, face: Mesh) -> np.ndarray:
    """``points`` on ``rest`` moved to the same barycentric places of the same triangles of ``face``."""
    import igl

    rv = rest.vertices.detach().double().cpu().numpy()
    fv = face.vertices.detach().double().cpu().numpy()
    ff = rest.faces.cpu().numpy().astype(np.int64)
    _, fid, on = igl.point_mesh_squared_distance(points, rv, ff)
    bary = igl.barycentric_coordinates(on, *(np.ascontiguousarray(rv[ff[fid, k]]) for k in range(3)))
    return (bary[:, :, None] * fv[ff[fid]]).sum(1)


def _covered(bv: np.ndarray, face: Mesh, falloff: torch.Tensor, cut: float, reach: float
             ) -> tuple[np.ndarray, np.ndarray]:
    """Body vertices whose closest face point lies where the face's falloff is at least ``cut`` (and near), and
    those closest points."""
    import igl

    fv = face.vertices.detach().double().cpu().numpy()
    ff = face.faces.cpu().numpy().astype(np.int64)
    w = falloff.double().cpu().numpy()
    dist, fid, closest = _closest(bv, fv, ff)
    bary = igl.barycentric_coordinates(closest, *(np.ascontiguousarray(fv[ff[fid, k]]) for k in range(3)))
    return ((bary * w[ff[fid]]).sum(1) >= cut) & (dist < reach), closest


def face_mask(vertices: torch.Tensor, faces: torch.Tensor, landmarks: torch.Tensor, width: float = 0.12
              ) -> torch.Tensor:
    """``[V]`` in [0, 1]: how much of the placed face is kept: the border falloff (``face_merge``), cut off in
    front of the ears (the face model has partial ears; the body's whole ears are kept instead): zero behind the
    jaw contour's top landmarks (0 and 16, at the tragus) plus 1 cm, rising to 1 over ``width``."""
    from idto3d.geometry.face_merge import border_falloff

    z_ear = float(vertices[landmarks[[0, 16]].long(), 2].mean()) + 0.05
    t = ((vertices[:, 2] - z_ear) / width).clamp(0.0, 1.0)
    return border_falloff(vertices, faces, width) * t * t * (3 - 2 * t)


def smooth_body(template: Mesh, faces: int) -> Mesh:
    """The template as a smooth, coarse body: edge-collapse decimation to ``faces / 4`` triangles, then one Loop
    subdivision (so the body is smooth, and cheap to UV-unwrap: a few large charts)."""
    import igl

    v = template.vertices.detach().double().cpu().numpy()
    f = template.faces.cpu().numpy().astype(np.int32)
    out = igl.decimate(v, f, max(faces // 4, 100))
    dv, df = np.asarray(out[0]), np.asarray(out[1])
    sv, sf = igl.loop(dv, df.astype(np.int64), 1)
    return Mesh(torch.from_numpy(np.asarray(sv)).float(), torch.from_numpy(np.asarray(sf, dtype=np.int64)))
