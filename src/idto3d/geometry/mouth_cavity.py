"""A mouth cavity for the offline expressions, in one topology shared by all of them.

The face model's mesh is closed over the mouth: its rows between the inner lips (iBUG 60-67, corners 60 and 64)
join the upper lip to the lower one, so an opened mouth stretches them into a sheet of lip skin across the gap.
Here the vertices between the lips (the *strip*, found once on the neutral face) become a pocket in every
expression that parts the lips:

* the lips' inner rims are edge paths through their landmarks (kept close to the landmarks' polyline); toward
  the corners the two rims are neighbouring rows, so every edge from one rim straight to the other is split once
  (its midpoint becomes a strip vertex): the refined mesh is the same for every expression;
* the strip is laid as a membrane across the opening: each strip vertex a fixed weighted mean of the rims'
  vertices (a uniform-Laplacian, Tutte-like embedding solved once on the neutral; the warp that opens the mouth
  folds the lips' inward curl, the membrane does not fold);
* the membrane is pushed back into the head along -Z by a depth that grows with how far the expression has
  parted the lips above it (``DEPTH_PER_OPENING``, at most ``MAX_DEPTH``), deepest half-way between the lips
  (an elliptic profile).

Where the lips are as in the neutral nothing moves (the closed expressions keep the face model's lips); the
change fades in over the first ``OPEN_RAMP`` of opening. The head stays one closed manifold with one topology
(the glTF morph targets, the shared UV layout). The strip's texels are coloured as the mouth's inside
(``texture.mouth``); in the neutral, where the strip is the lips' few millimetres of contact, they read as the
dark line between the lips.

Coordinates are the face model's working space (+Y up, the face looks down +Z, 1 unit = 0.2 m).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from idto3d.core.errors import IdtoError

UPPER_INNER = (60, 61, 62, 63, 64)  # the upper inner lip, corner to corner (iBUG)
LOWER_INNER = (60, 67, 66, 65, 64)  # the lower inner lip, same direction
DEPTH_PER_OPENING = 1.0  # cavity depth per unit of lip separation gained over the neutral
MAX_DEPTH = 0.15         # working units (30 mm): well inside the head at the mouth's height
OPEN_RAMP = 0.01         # working units (2 mm) of lip opening over which the pocket fades in
_FOLLOW = 0.0025         # working units (0.5 mm): how closely a lip's rim path keeps to its landmarks' polyline
_MAX_STRIP = 0.05        # a "strip" of more than this share of the face is not between the lips


@dataclass(frozen=True)
class MouthStrip:
    """The face mesh refined between the lips, and its vertices between the inner lips of the neutral face."""

    faces: np.ndarray      # [F', 3] the face model's triangles with the edges from lip to lip split
    split: np.ndarray      # [N, 2] the split edges: added vertex V + i is the midpoint of split[i]
    vertices: np.ndarray   # [S] vertex indices (of the refined mesh) between the lips
    rim: np.ndarray        # [B] the vertices around them (the lips' inner rims, the corners)
    weights: np.ndarray    # [S, B] each strip vertex as a weighted mean of the rim (rows sum to 1)
    across: np.ndarray     # [S] in (0, 1): from the upper lip (0) to the lower lip (1), along the membrane
    x: np.ndarray          # [S] neutral x (across the mouth), where the lips' opening is read
    landmarks: np.ndarray  # [68, 3] the neutral's landmark points

    def extend(self, vertices: np.ndarray) -> np.ndarray:
        """``[V, 3]`` face-model vertices -> ``[V + N, 3]``, the split edges' midpoints appended."""
        return _with_midpoints(vertices, self.split)


def _with_midpoints(vertices: np.ndarray, edges: np.ndarray) -> np.ndarray:
    v = np.asarray(vertices, dtype=np.float64)
    return np.concatenate([v, 0.5 * (v[edges[:, 0]] + v[edges[:, 1]])])


def _edge_graph(vertices: np.ndarray, faces: np.ndarray, contour: np.ndarray | None = None):
    """The mesh's edges as a sparse graph weighted by length; with ``contour`` (``[K, 3]`` points ordered
    across the mouth) an edge's weight grows with its distance (in y, seen from the front) from that polyline,
    so shortest paths follow it."""
    import scipy.sparse as sp

    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    weight = np.linalg.norm(vertices[e[:, 0]] - vertices[e[:, 1]], axis=1)
    if contour is not None:
        mid = 0.5 * (vertices[e[:, 0]] + vertices[e[:, 1]])
        weight = weight * (1.0 + ((mid[:, 1] - _contour_y(contour, mid[:, 0])) / _FOLLOW) ** 2)
    n = vertices.shape[0]
    g = sp.coo_matrix((weight, (e[:, 0], e[:, 1])), shape=(n, n)).tocsr()
    return g.maximum(g.T).tocsr()


def _contour_y(points: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The y of the polyline ``points [K, 3]`` (ordered by x) at ``x``."""
    order = np.argsort(points[:, 0], kind="stable")
    return np.interp(x, points[order, 0], points[order, 1])


def _rim_path(vertices: np.ndarray, faces: np.ndarray, ids: list[int]) -> np.ndarray:
    """The vertices of the path through the vertices ``ids`` in order that follows their polyline."""
    from scipy.sparse.csgraph import dijkstra

    graph = _edge_graph(vertices, faces, vertices[ids])
    path = [ids[0]]
    for a, b in zip(ids[:-1], ids[1:]):
        # Not bounded by the mouth's width: where the lips' rows leave the landmarks' polyline by more than
        # _FOLLOW (the photometrically refined astronaut), the penalised path costs more than that.
        _, pred = dijkstra(graph, indices=b, return_predecessors=True)
        v, leg = a, []
        while v != b:
            v = int(pred[v])
            if v < 0:
                raise IdtoError("the face model's inner lips are not joined by its mesh; no mouth strip")
            leg.append(v)
        path.extend(leg)
    return np.asarray(path, dtype=np.int64)


def _membrane(graph, strip: np.ndarray, rim: np.ndarray) -> np.ndarray:
    """``[S, B]``: the uniform-Laplacian (Tutte) weights of the ``strip`` vertices on the ``rim`` vertices."""
    adj = (graph > 0).astype(np.float64).tocsr()
    a_ss = adj[strip][:, strip].toarray()
    a_sb = adj[strip][:, rim].toarray()
    laplacian = np.diag(a_ss.sum(1) + a_sb.sum(1)) - a_ss
    return np.linalg.solve(laplacian, a_sb)


def _split_edges(faces: np.ndarray, n: int, edges: np.ndarray) -> np.ndarray:
    """``faces`` with each of ``edges [N, 2]`` split at a new vertex ``n + i`` (a triangle with one split edge
    becomes two, with two split edges three; orientation kept)."""
    mid = {(int(min(a, b)), int(max(a, b))): n + i for i, (a, b) in enumerate(edges)}
    ends = np.zeros(max(n, int(faces.max()) + 1), bool)
    ends[np.asarray(edges, dtype=np.int64).ravel()] = True
    touched = ends[faces].sum(1) >= 2  # only these can hold a split edge
    out = [faces[~touched]]
    for tri in faces[touched].tolist():
        cut = [mid.get((min(tri[k], tri[(k + 1) % 3]), max(tri[k], tri[(k + 1) % 3]))) for k in range(3)]
        count = sum(c is not None for c in cut)
        if count == 0:
            out.append([tri])
            continue
        # Rotate so the corner between the cut edges (two cuts) or after the cut edge (one cut) comes first.
        k = next(k for k in range(3) if (cut[k] is not None) if count == 1 or cut[(k + 2) % 3] is not None)
        a, b, c = tri[k], tri[(k + 1) % 3], tri[(k + 2) % 3]
        m_ab = cut[k]
        if count == 1:
            out.append([[a, m_ab, c], [m_ab, b, c]])
        else:  # cuts on (a, b) and (c, a)
            m_ca = cut[(k + 2) % 3]
            out.append([[a, m_ab, m_ca], [m_ab, b, c], [m_ab, c, m_ca]])
    return np.concatenate([np.asarray(t, dtype=np.int64).reshape(-1, 3) for t in out])


def mouth_strip(neutral: np.ndarray, faces: np.ndarray, landmarks: np.ndarray) -> MouthStrip:
    """The strip of the neutral face ``neutral [V, 3]`` (triangles ``faces``, 68 landmark vertex indices
    ``landmarks``): its rims are the shortest edge paths through the upper inner lip's landmarks (60-64) and the
    lower's (60, 67-64); where an edge joins the two lips directly (toward the corners the lips' rows touch) it is
    split, so a row lies between the lips all along; the strip is every vertex the rims enclose (the lips'
    contact rows, their inward curl included, wherever the curl lies seen from the front)."""
    from scipy.sparse.csgraph import connected_components

    lm = np.asarray(landmarks, dtype=np.int64)
    upper = _rim_path(neutral, faces, [int(lm[i]) for i in UPPER_INNER])
    lower = _rim_path(neutral, faces, [int(lm[i]) for i in LOWER_INNER])
    n = neutral.shape[0]
    is_upper, is_lower = np.zeros(n, bool), np.zeros(n, bool)
    is_upper[upper], is_lower[lower] = True, True
    corners = is_upper & is_lower
    e = np.unique(np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1), axis=0)
    bridge = e[((is_upper[e[:, 0]] & is_lower[e[:, 1]]) | (is_lower[e[:, 0]] & is_upper[e[:, 1]]))
               & ~corners[e].any(1)]
    faces = _split_edges(np.asarray(faces, dtype=np.int64), n, bridge)
    refined = _with_midpoints(neutral, bridge)
    graph = _edge_graph(refined, faces)
    keep = np.ones(refined.shape[0], bool)
    keep[upper], keep[lower] = False, False
    # The enclosed vertices: every component of the mesh without the rims but the face's outside (the largest).
    label = connected_components(graph[keep][:, keep], directed=False)[1]
    inside = np.zeros(refined.shape[0], bool)
    inside[np.nonzero(keep)[0][label != np.bincount(label).argmax()]] = True
    if not inside.any() or inside.sum() > _MAX_STRIP * refined.shape[0]:
        raise IdtoError("the face model's inner lips do not enclose a strip of its mesh; no mouth cavity")
    ids = np.nonzero(inside)[0]
    touching = np.unique(faces[inside[faces].any(1)])
    rim = touching[~inside[touching]]
    weights = _membrane(graph, ids, rim)
    side = np.where(is_lower[rim], 1.0, 0.0)
    side[corners[rim]] = 0.5
    return MouthStrip(faces, bridge, ids, rim, weights, weights @ side, refined[ids, 0].copy(), neutral[lm].copy())


def _lip_y(strip: MouthStrip, lips: tuple[int, ...], lm: np.ndarray) -> np.ndarray:
    # Read at the neutral's x: the strip's vertices keep their place along the mouth.
    xs = strip.landmarks[list(lips), 0]
    order = np.argsort(xs, kind="stable")
    return np.interp(strip.x, xs[order], lm[list(lips), 1][order])


def lip_opening(strip: MouthStrip, landmarks: np.ndarray) -> np.ndarray:
    """``[S]``: how much farther apart (vertically) the inner lips are above and below each strip vertex in an
    expression (its 68 landmark points ``landmarks``) than in the neutral; >= 0."""
    def gap(lm: np.ndarray) -> np.ndarray:
        return _lip_y(strip, UPPER_INNER, lm) - _lip_y(strip, LOWER_INNER, lm)

    return np.maximum(gap(landmarks) - gap(strip.landmarks), 0.0)


def cavity_depth(strip: MouthStrip, landmarks: np.ndarray) -> np.ndarray:
    """``[S]`` how far each strip vertex goes back into the head from the membrane (working units) in the
    expression whose 68 landmark points are ``landmarks``."""
    profile = np.sqrt(np.clip(4.0 * strip.across * (1.0 - strip.across), 0.0, 1.0))
    return np.minimum(DEPTH_PER_OPENING * lip_opening(strip, landmarks), MAX_DEPTH) * profile


def carve_mouth(vertices: np.ndarray, strip: MouthStrip, landmarks: np.ndarray) -> np.ndarray:
    """``vertices [V, 3]`` of one expression (landmark vertex indices ``landmarks [68]``) with the strip laid
    across the opening and pushed back along -Z (into the head) by :func:`cavity_depth`: the open mouth's
    pocket."""
    out = np.array(vertices, dtype=np.float64, copy=True)
    lm = out[landmarks]
    pocket = strip.weights @ out[strip.rim]
    pocket[:, 2] -= cavity_depth(strip, lm)
    fade = np.clip(lip_opening(strip, lm) / OPEN_RAMP, 0.0, 1.0)[:, None]
    out[strip.vertices] = (1.0 - fade) * out[strip.vertices] + fade * pocket
    return out
