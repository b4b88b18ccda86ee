"""Merge a fitted face surface into the closed head template: the subject-fitted initial shape.

A morphable face model covers the face only (an open mask, no back of the head, no neck), while the geometry
field is regressed to a closed surface. So the template stays the closed base and its front is pulled onto the
face: the face is placed on the template by a similarity transform between facial anchors (eyes, nasion, nose
tip, mouth, chin; ``template.face_anchors``), every template vertex near the placed face moves to its closest
point on the face, weighted by how far inside the face mask that point lies (a smooth falloff toward the mask's
border, so there is no step where the face ends), and the displacement field is smoothed over the template
before it is applied. The result keeps the template's topology: closed and manifold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from idto3d.core.errors import IdtoError
from idto3d.geometry.template import face_anchors
from idto3d.render.mesh import Mesh

# dlib/iBUG-68 landmark groups of each anchor in ``template.face_anchors``.
ANCHOR_LANDMARKS: dict[str, Sequence[int]] = {
    "right_eye": range(36, 42), "left_eye": range(42, 48), "nasion": (27,), "nose_tip": (30,),
    "mouth": range(48, 68), "chin": (8,),
}


@dataclass
class Similarity:
    """``x -> scale * rotation @ x + translation``."""

    scale: float
    rotation: torch.Tensor     # [3, 3]
    translation: torch.Tensor  # [3]

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        return self.scale * points @ self.rotation.T + self.translation


def umeyama(source: torch.Tensor, target: torch.Tensor) -> Similarity:
    """The least-squares similarity taking ``source [N, 3]`` onto ``target [N, 3]`` (Umeyama 1991)."""
    src, dst = source.double(), target.double()
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / src.shape[0]
    u, sig, vt = torch.linalg.svd(cov)
    d = torch.eye(3, dtype=torch.float64)
    if torch.det(u) * torch.det(vt) < 0:
        d[2, 2] = -1.0
    rot = u @ d @ vt
    scale = float((sig * d.diagonal()).sum() / xs.square().sum(1).mean())
    trans = mu_d - scale * rot @ mu_s
    return Similarity(scale, rot.float(), trans.float())


def anchor_points(vertices: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
    """``[6, 3]`` anchors of a face (vertices + its 68 landmark vertex indices), in ``ANCHOR_LANDMARKS`` order."""
    lm = vertices[landmarks.long()]
    return torch.stack([lm[list(idx)].mean(0) for idx in ANCHOR_LANDMARKS.values()])


def placement(vertices: torch.Tensor, landmarks: torch.Tensor) -> Similarity:
    """Where a face goes on the built-in template: its anchors onto the template's."""
    target = face_anchors()
    return umeyama(anchor_points(vertices, landmarks), torch.stack([target[k] for k in ANCHOR_LANDMARKS]))


def _edges(faces: np.ndarray) -> np.ndarray:
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    return np.unique(np.sort(e, axis=1), axis=0)


def border_falloff(vertices: torch.Tensor, faces: torch.Tensor, width: float) -> torch.Tensor:
    """``[V]`` in [0, 1]: 0 on the open mesh's border, rising smoothly to 1 at ``width`` (surface distance)."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import dijkstra

    v = vertices.detach().double().numpy()
    f = faces.numpy()
    e = _edges(f)
    # Border vertices: on an edge used by one face only.
    all_e = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    uniq, counts = np.unique(all_e, axis=0, return_counts=True)
    border = np.unique(uniq[counts == 1].ravel())
    if border.size == 0:
        return torch.ones(vertices.shape[0])
    length = np.linalg.norm(v[e[:, 0]] - v[e[:, 1]], axis=1)
    n = v.shape[0]
    graph = sp.coo_matrix((np.concatenate([length, length]), (np.concatenate([e[:, 0], e[:, 1]]),
                                                               np.concatenate([e[:, 1], e[:, 0]]))), shape=(n, n))
    dist = dijkstra(graph.tocsr(), indices=border, min_only=True, limit=width * 1.01)
    t = np.clip(np.nan_to_num(dist, posinf=width) / width, 0.0, 1.0)
    return torch.from_numpy(t * t * (3 - 2 * t)).float()


def _smooth(values: torch.Tensor, faces: torch.Tensor, iterations: int) -> torch.Tensor:
    """Uniform-Laplacian smoothing of per-vertex values over the mesh graph."""
    e = torch.from_numpy(_edges(faces.numpy()))
    n = values.shape[0]
    deg = torch.zeros(n).index_add_(0, e[:, 0], torch.ones(len(e))).index_add_(0, e[:, 1], torch.ones(len(e)))
    for _ in range(iterations):
        acc = torch.zeros_like(values).index_add_(0, e[:, 0], values[e[:, 1]]).index_add_(0, e[:, 1], values[e[:, 0]])
        values = 0.5 * values + 0.5 * acc / deg.clamp(min=1)[:, None]
    return values


def merge_face(template: Mesh, face: Mesh, weights: torch.Tensor, *, reach: float = 0.12,
               smooth_iterations: int = 4) -> Mesh:
    """The template with its front pulled onto ``face`` (already placed in working space).

    ``weights [V_face]`` in [0, 1] say how much each face vertex may pull (``border_falloff``); template
    vertices farther than ``reach`` from the face, or whose normal points away from the face's, stay.
    """
    import igl

    tv = template.vertices.detach().double().numpy()
    fv = face.vertices.detach().double().numpy()
    ff = face.faces.numpy().astype(np.int64)
    if fv.shape[0] == 0 or ff.shape[0] == 0:
        raise IdtoError("the fitted face has no triangles to merge into the template")
    d2, fid, closest = igl.point_mesh_squared_distance(tv, fv, ff)
    # Barycentric weights of the closest points, to interpolate the pull weights.
    a, b, c = (fv[ff[fid, k]] for k in range(3))
    bary = igl.barycentric_coordinates(closest, a, b, c)
    w_face = weights.double().numpy()
    w = (bary * w_face[ff[fid]]).sum(1)
    tn = template.vertex_normals().detach().double().numpy()
    fn = Mesh(face.vertices.detach(), face.faces).face_normals().double().numpy()[fid]
    dist = np.sqrt(d2)
    facing = np.clip((tn * fn).sum(1) * 2.0, 0.0, 1.0)  # full weight within 60 deg, none past 90
    near = np.clip(1.5 - dist / reach, 0.0, 1.0)          # fades out between reach/2 and 1.5 reach
    w = w * facing * np.clip(near * 2.0, 0.0, 1.0)
    disp = torch.from_numpy((closest - tv) * w[:, None]).float()
    disp = _smooth(disp, template.faces, smooth_iterations)
    return Mesh(template.vertices.detach() + disp, template.faces.clone())
