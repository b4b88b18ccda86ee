"""Merging a fitted face into the closed head template: placement, pull onto the face, smooth border, closed."""

from __future__ import annotations

import math

import numpy as np
import torch
import trimesh

from idto3d.geometry.face_merge import border_falloff, merge_face, umeyama
from idto3d.geometry.template import build_head_template, face_anchors, head_template_sdf
from idto3d.render.mesh import Mesh


def _front_patch(mesh: Mesh, z_min: float = 0.25) -> Mesh:
    """The template's face region as an open mesh (faces whose vertices all lie in front of z_min)."""
    keep = (mesh.vertices[mesh.faces][..., 2] > z_min).all(1)
    faces = mesh.faces[keep]
    used = torch.unique(faces)
    remap = torch.full((mesh.vertices.shape[0],), -1, dtype=torch.long)
    remap[used] = torch.arange(used.numel())
    return Mesh(mesh.vertices[used].clone(), remap[faces])


def test_umeyama_recovers_a_known_similarity():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(10, 3, generator=g)
    angle = 0.4
    rot = torch.tensor([[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]])
    dst = 1.7 * src @ rot.T + torch.tensor([0.1, -0.2, 0.3])
    sim = umeyama(src, dst)
    assert abs(sim.scale - 1.7) < 1e-4 and torch.allclose(sim.rotation, rot, atol=1e-4)
    assert torch.allclose(sim(src), dst, atol=1e-4)


def test_border_falloff_is_zero_on_the_border_and_one_inside():
    patch = _front_patch(build_head_template(48))
    w = border_falloff(patch.vertices, patch.faces, width=0.1)
    tm = trimesh.Trimesh(patch.vertices.numpy(), patch.faces.numpy(), process=False)
    border = np.unique(tm.edges[trimesh.grouping.group_rows(tm.edges_sorted, require_count=1)].ravel())
    assert float(w[border].max()) == 0.0
    nose = int(torch.argmax(patch.vertices[:, 2]))
    assert float(w[nose]) == 1.0 and 0.0 < float(w.mean()) < 1.0


def test_merged_head_follows_the_face_and_stays_closed():
    template = build_head_template(48)
    patch = _front_patch(build_head_template(64))
    # The "subject": the same face pushed 0.04 units out (a fuller face), placed exactly.
    face = Mesh(patch.vertices + 0.04 * patch.vertex_normals(), patch.faces)
    w = border_falloff(face.vertices, face.faces, width=0.1)
    merged = merge_face(template, face, w)
    tm = trimesh.Trimesh(merged.vertices.numpy(), merged.faces.numpy(), process=False)
    assert tm.is_watertight and tm.is_winding_consistent
    sdf = head_template_sdf(merged.vertices)
    v = template.vertices
    front = (v[:, 2] > 0.45) & (v[:, 1].abs() < 0.25) & (v[:, 0].abs() < 0.25)
    back = v[:, 2] < -0.1
    # The face moved out by most of the push (the smoothing of the displacements takes a little off).
    assert float(sdf[front].median()) > 0.022
    move = (merged.vertices - template.vertices).norm(dim=1)
    assert float(move[back].max()) < 1e-6  # the back of the head did not move
    # No step at the border: neighbouring vertices move by similar amounts.
    e = torch.from_numpy(tm.edges_unique)
    assert float((move[e[:, 0]] - move[e[:, 1]]).abs().max()) < 0.02


def test_face_anchors_lie_on_the_template_surface():
    sdf = head_template_sdf(torch.stack(list(face_anchors().values())))
    assert float(sdf.abs().max()) < 0.02
