"""Clean exported meshes: one body, manifold, closed, and smooth where the surface comes from a grid.

Marching tets leaves what an artist (and ``geometry.mesh_io.validate_mesh``) trips over: coincident vertices and
the zero-area faces between them, detached fragments (a few tets of SDF floating under the chin), edges shared
by more than two faces where two sheets touch, and a stair-stepped surface at the grid's spacing. The stitched
offline head can also carry small fragments or holes where the face and body meet. ``clean_meshes`` repairs a set
of expression meshes at once: when they share one topology (the offline heads, morph targets) the repair is
decided on the first (neutral) mesh and the *same* vertex/face selection is applied to every one, so the shared
topology survives; otherwise each mesh is cleaned on its own.

Steps, in order: weld coincident vertices, drop zero-area and duplicate faces, drop every face on a
non-manifold edge, keep the components of at least ``MIN_COMPONENT_SHARE`` of the faces (the head; a fragment is
a few dozen of tens of thousands), fill holes of at most ``MAX_HOLE_EDGES`` edges by a fan over the hole's own
vertices (no new vertices: the selection stays a pure re-indexing), and, for grid-extracted meshes only, Taubin
smoothing (trimesh's ``filter_taubin``: alternating shrink/inflate steps remove the grid's stair-steps without the
shrinkage plain Laplacian smoothing has). Larger holes are left open on purpose (a neck cut is a design choice,
not a defect).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from idto3d.render.mesh import Mesh

MIN_COMPONENT_SHARE = 0.05  # of the faces: a component smaller than this is a fragment, not part of the head
MAX_HOLE_EDGES = 64         # holes with more boundary edges are left open (cuts, not defects)
TAUBIN_ITERATIONS = 20      # half-steps (10 shrink/inflate pairs): cuts a staircase's normal error ~40%, volume ~0.2%
_WELD_TOLERANCE = 1e-7      # model units (the head is ~1.6 wide): below float32 noise at that scale
_MIN_AREA = 1e-12           # squared model units: a face with less is degenerate


@dataclass(frozen=True)
class MeshDefects:
    """What ``validate_mesh`` and an artist check: connected components (by shared edges), edges used by
    more than two faces, edges used by one (the rim of a hole), zero-area faces."""

    components: int
    nonmanifold_edges: int
    boundary_edges: int
    degenerate_faces: int

    @property
    def clean(self) -> bool:
        return self.components == 1 and self.nonmanifold_edges == 0 and self.degenerate_faces == 0


@dataclass(frozen=True)
class CleanSelection:
    """A topology repair as a re-indexing: output vertex ``i`` copies input vertex ``vertices[i]``; ``faces``
    index the output vertices. Apply it to any mesh with the input's vertex count (``apply``)."""

    vertices: np.ndarray     # int64 [V']
    faces: np.ndarray        # int64 [F', 3]
    face_source: np.ndarray  # int64 [F']: the input face each output face is (-1: a face filling a hole)

    @property
    def identity(self) -> bool:
        """True when nothing was repaired (the output is the input)."""
        n = self.faces.shape[0]
        return bool(np.array_equal(self.vertices, np.arange(self.vertices.size))
                    and np.array_equal(self.face_source, np.arange(n)))

    def vertex_of(self, source_vertices: np.ndarray) -> np.ndarray:
        """The output vertex of each input vertex in ``source_vertices`` (-1: dropped or welded away)."""
        inverse = np.full(int(max(self.vertices.max(), np.max(source_vertices))) + 1, -1, np.int64)
        inverse[self.vertices] = np.arange(self.vertices.size)
        return np.where(source_vertices >= 0, inverse[np.maximum(source_vertices, 0)], -1)

    def apply(self, mesh: Mesh) -> Mesh:
        v = mesh.vertices.detach()[torch.as_tensor(self.vertices, device=mesh.vertices.device)]
        return Mesh(v, torch.as_tensor(self.faces, device=mesh.faces.device))


def _arrays(mesh: Mesh) -> tuple[np.ndarray, np.ndarray]:
    return (mesh.vertices.detach().cpu().double().numpy(),
            mesh.faces.detach().cpu().numpy().astype(np.int64))


def _edges(f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted undirected edges per face corner ``[3F, 2]``, the unique edges, and each corner's unique index."""
    e = np.sort(np.stack([f, np.roll(f, -1, axis=1)], axis=2).reshape(-1, 2), axis=1)
    unique, inverse = np.unique(e, axis=0, return_inverse=True)
    return e, unique, inverse.reshape(-1)


def _face_components(f: np.ndarray) -> np.ndarray:
    """Component label of each face, faces joined when they share an edge."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if f.shape[0] == 0:
        return np.zeros(0, np.int64)
    _, unique, inverse = _edges(f)
    face_of = np.repeat(np.arange(f.shape[0]), 3)
    incidence = coo_matrix((np.ones(face_of.size), (face_of, inverse)), shape=(f.shape[0], unique.shape[0])).tocsr()
    return connected_components(incidence @ incidence.T, directed=False)[1]


def _areas(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    return 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1)


def mesh_defects(mesh: Mesh) -> MeshDefects:
    """Count ``mesh``'s defects (see ``MeshDefects``)."""
    v, f = _arrays(mesh)
    _, _, inverse = _edges(f)
    counts = np.bincount(inverse)
    labels = _face_components(f)
    return MeshDefects(components=int(labels.max() + 1) if labels.size else 0,
                       nonmanifold_edges=int((counts > 2).sum()), boundary_edges=int((counts == 1).sum()),
                       degenerate_faces=int((_areas(v, f) <= _MIN_AREA).sum()))


def _weld(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    """``f`` with every vertex replaced by the first (lowest-index) vertex at its position."""
    key = np.round(v / _WELD_TOLERANCE).astype(np.int64)
    _, inverse = np.unique(key, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    representative = np.full(inverse.max() + 1, v.shape[0], np.int64)
    np.minimum.at(representative, inverse, np.arange(v.shape[0]))
    return representative[inverse][f]


def _good_faces(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Indices of the faces with area, each once (a doubled face makes its three edges non-manifold)."""
    ok = np.flatnonzero((_areas(v, f) > _MIN_AREA) & (f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2]))
    _, first = np.unique(np.sort(f[ok], axis=1), axis=0, return_index=True)
    return ok[np.sort(first)]


def _manifold_faces(f: np.ndarray) -> np.ndarray:
    """Indices of the faces on no edge used more than twice (hole filling closes what dropping the rest opens)."""
    _, _, inverse = _edges(f)
    bad_edge = np.bincount(inverse) > 2
    return np.flatnonzero(~bad_edge[inverse].reshape(-1, 3).any(axis=1))


def _large_component_faces(f: np.ndarray) -> np.ndarray:
    """Indices of the faces in the largest component and in any holding ``MIN_COMPONENT_SHARE`` of the faces."""
    labels = _face_components(f)
    sizes = np.bincount(labels)
    keep = sizes >= max(MIN_COMPONENT_SHARE * f.shape[0], 1)
    keep[np.argmax(sizes)] = True
    return np.flatnonzero(keep[labels])


def _boundary_loops(f: np.ndarray) -> list[list[int]]:
    """Holes as vertex loops following the faces' boundary half-edges (a->b with no b->a)."""
    half = np.stack([f, np.roll(f, -1, axis=1)], axis=2).reshape(-1, 2)
    present = {(int(a), int(b)) for a, b in half}
    nxt: dict[int, list[int]] = {}
    for a, b in half:
        if (int(b), int(a)) not in present:
            nxt.setdefault(int(a), []).append(int(b))
    loops = []
    while nxt:
        start = next(iter(nxt))
        loop, cur = [start], start
        while True:
            outs = nxt.get(cur)
            if not outs:
                break
            b = outs.pop()
            if not outs:
                del nxt[cur]
            if b == start:
                loops.append(loop)
                break
            loop.append(b)
            cur = b
    return loops


def _hole_fans(f: np.ndarray) -> np.ndarray:
    """``[N, 3]``: a fan over each hole of at most ``MAX_HOLE_EDGES`` edges, wound to match the rim's faces."""
    fans = []
    for loop in _boundary_loops(f):
        if 3 <= len(loop) <= MAX_HOLE_EDGES:
            fans += [(loop[0], loop[i + 1], loop[i]) for i in range(1, len(loop) - 1)]
    return np.asarray(fans, np.int64).reshape(-1, 3)


def clean_selection(mesh: Mesh) -> CleanSelection:
    """The topology repair of ``mesh`` (see the module docstring), as a re-indexing of its vertices."""
    v, f = _arrays(mesh)
    f = _weld(v, f)
    source = np.arange(f.shape[0])
    for _ in range(3):  # dropping non-manifold faces can leave fragments and holes; repeat until nothing changes
        for select in (_good_faces, lambda _, faces: _manifold_faces(faces)):
            pick = select(v, f)
            f, source = f[pick], source[pick]
        pick = _large_component_faces(f)
        f, source = f[pick], source[pick]
        fans = _hole_fans(f)
        f, source = np.concatenate([f, fans]), np.concatenate([source, np.full(fans.shape[0], -1)])
        pick = _good_faces(v, f)
        pick = pick[_manifold_faces(f[pick])]
        f, source = f[pick], source[pick]
        if fans.shape[0] == 0 and mesh_defects(Mesh(torch.from_numpy(v), torch.from_numpy(f))).clean:
            break
    used = np.unique(f)  # sorted: kept vertices keep their order
    remap = np.full(v.shape[0], -1, np.int64)
    remap[used] = np.arange(used.size)
    return CleanSelection(vertices=used.astype(np.int64), faces=remap[f], face_source=source)


def taubin_smooth(mesh: Mesh, iterations: int = TAUBIN_ITERATIONS) -> Mesh:
    """``mesh`` with Taubin's lambda|mu smoothing (same topology): the stair-steps of a grid go, the volume stays."""
    import trimesh
    from trimesh.smoothing import filter_taubin

    v, f = _arrays(mesh)
    tm = trimesh.Trimesh(v, f, process=False)
    filter_taubin(tm, lamb=0.5, nu=0.53, iterations=iterations)
    out = torch.from_numpy(np.asarray(tm.vertices)).to(mesh.vertices)
    return Mesh(out, mesh.faces.detach().clone())


def clean_meshes(meshes: Sequence[Mesh], smooth: bool = False) -> list[Mesh]:
    """Clean a set of expression meshes; ``smooth``: they come from the DMTet grid (never for a fitted face).

    Meshes that share the first one's topology get its selection (their shared topology survives, for UV layouts
    and morph targets); the others are cleaned on their own.
    """
    if not meshes:
        return []
    first = meshes[0]
    selection = clean_selection(first)
    out = []
    for m in meshes:
        shared = m.vertices.shape[0] == first.vertices.shape[0] and torch.equal(m.faces.cpu(), first.faces.cpu())
        cleaned = (selection if shared else clean_selection(m)).apply(m)
        out.append(taubin_smooth(cleaned) if smooth else cleaned)
    return out
