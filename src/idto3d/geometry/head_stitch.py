"""The offline head at full resolution: the fitted face mesh itself, stitched into a smooth head body.

``face_merge.merge_face`` pulls the template's front onto the face, which keeps the template's resolution (and the
geometry field's remesh, grid 48, kept even less). Here the face keeps every vertex of the face model and the body
(the merged template, decimated to a smooth coarse mesh) supplies the rest of the head:

* the body's vertices whose closest face point lies well inside the face mask (the mask's border falloff at or
  above ``cut``) are cut out, leaving one hole; the face keeps the part of its mask above the same ``cut``;
* the face's outer band is blended onto the body (``v -> c + s (v - c)``, ``c`` its closest body point, ``s`` a
  smoothstep of the falloff from ``cut`` to 1), so the face's cut edge lies on the body: no step at the border;
* the gap between the two loops is closed by a zipper of triangles (the shorter diagonal first), oriented so
  every edge of the result is shared by two faces in opposite directions: one closed, manifold surface.

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


def _zipper(inner: np.ndarray, outer: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Triangles between two loops that wind the same way (vertex ids into ``pos``), the shorter diagonal
    first. ``inner`` is the face's loop as its faces traverse it; ``outer`` runs against the body's."""
    start = int(np.argmin(np.linalg.norm(pos[outer] - pos[inner[0]], axis=1)))
    outer = np.roll(outer, -start)
    n, m = inner.size, outer.size
    i = j = 0
    tris = []
    while i < n or j < m:
        a0, a1 = inner[i % n], inner[(i + 1) % n]
        b0, b1 = outer[j % m], outer[(j + 1) % m]
        advance_inner = j >= m or (i < n and np.linalg.norm(pos[a1] - pos[b0]) <= np.linalg.norm(pos[b1] - pos[a0]))
        if advance_inner:
            tris.append((a1, a0, b0))  # the face has a0 -> a1, so this triangle has a1 -> a0
            i += 1
        else:
            tris.append((b0, b1, a0))  # the body has b1 -> b0 (outer runs against it)
            j += 1
    return np.asarray(tris, dtype=np.int64)


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
    covered, _ = _covered(bv, face, falloff, cut, reach)
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
    bridge = _zipper(inner, outer, pos)
    blend = np.clip((w[face_ids] - cut) / (1.0 - cut), 0.0, 1.0)
    blend[inner - body_ids.size] = 0.0  # the cut edge itself lies on the body
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
                 radius: float = 0.3) -> Mesh:
    """``body`` bent onto the face: the vertices under the face's inner part (falloff >= ``cut``) go to their
    closest face points, those farther than ``radius`` from them stay, and the rest follow a biharmonic
    interpolation of those displacements (``igl.harmonic``, k = 2): smooth up to the cut, so the stitch has no
    step. The body keeps its topology."""
    import igl
    from scipy.spatial import cKDTree

    bv = body.vertices.detach().double().cpu().numpy()
    bf = body.faces.cpu().numpy().astype(np.int64)
    covered, closest = _covered(bv, face, falloff, cut, reach)
    if not covered.any():
        raise IdtoError("the fitted face does not lie on the head body; it cannot be stitched in")
    far = cKDTree(bv[covered]).query(bv, k=1)[0] > radius
    b = np.nonzero(covered | far)[0]
    bc = np.where(covered[b, None], closest[b] - bv[b], 0.0)
    disp = igl.harmonic(bv, bf, b.astype(np.int64), bc, 2)
    return Mesh(torch.from_numpy(bv + np.asarray(disp)).float(), body.faces.clone())


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
