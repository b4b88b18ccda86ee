"""geometry.mesh_clean: a head with the defects the issue found (a fragment, touching sheets, a hole, a doubled
face, collapsed faces, grid stair-steps) comes out as one closed manifold our own validator accepts; expressions
that share a topology keep sharing it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idto3d.geometry.mesh_clean import MIN_COMPONENT_SHARE, clean_meshes, clean_selection, mesh_defects, taubin_smooth
from idto3d.geometry.mesh_io import validate_mesh
from idto3d.render.mesh import Mesh


def _sphere() -> tuple[np.ndarray, np.ndarray]:
    import trimesh

    s = trimesh.creation.icosphere(subdivisions=3, radius=0.8)
    return np.asarray(s.vertices, np.float64), np.asarray(s.faces, np.int64)


def _messy() -> Mesh:
    """An icosphere with a hole (one vertex's fan removed), a detached fragment, a flap on one of its edges
    (non-manifold), a doubled face, a zero-area face, and a duplicated vertex splitting a seam."""
    v, f = _sphere()
    fan = (f == 5).any(axis=1)
    f = f[~fan]  # a hole of 5-6 edges
    frag = np.array([[0.0, -1.2, 0.0], [0.05, -1.2, 0.0], [0.0, -1.2, 0.05]])  # under the "chin"
    apex = v[f[0]].mean(0) + np.array([0.0, 0.0, 0.3])
    n = v.shape[0]
    v = np.concatenate([v, frag, apex[None], v[f[10, :1]]])
    extra = np.array([[n, n + 1, n + 2],                   # fragment
                      [f[0, 0], f[0, 1], n + 3],           # flap: f[0]'s first edge gets a third face
                      [f[20, 0], f[20, 1], f[20, 0]]])     # collapsed
    f = np.concatenate([f, extra, f[30:31]])               # doubled face
    f[10, 0] = n + 4                                       # a split (coincident) vertex
    return Mesh(torch.from_numpy(v).float(), torch.from_numpy(f))


def test_a_messy_head_becomes_one_closed_manifold_the_validator_accepts():
    raw = _messy()
    before = mesh_defects(raw)
    print("before", before)
    assert before.components >= 2 and before.nonmanifold_edges > 0 and before.boundary_edges > 0
    clean = clean_meshes([raw])[0]
    after = mesh_defects(clean)
    print("after", after)
    assert after.components == 1 and after.nonmanifold_edges == 0 and after.boundary_edges == 0
    assert after.degenerate_faces == 0
    validate_mesh(clean, require_watertight=True)  # what `idto3d render` runs
    import trimesh

    tm = trimesh.Trimesh(clean.vertices.numpy(), clean.faces.numpy(), process=False)
    sphere = trimesh.Trimesh(*_sphere(), process=False)
    assert tm.is_watertight and tm.is_winding_consistent
    assert tm.volume == pytest.approx(sphere.volume, rel=0.02)  # the hole was filled, not the head thrown away


def test_a_clean_mesh_is_left_as_it_is():
    v, f = _sphere()
    sel = clean_selection(Mesh(torch.from_numpy(v).float(), torch.from_numpy(f)))
    assert sel.identity


def test_a_second_body_above_the_size_threshold_is_kept():
    v, f = _sphere()
    two = Mesh(torch.from_numpy(np.concatenate([v, v + 3.0])).float(), torch.from_numpy(np.concatenate([f, f + len(v)])))
    assert mesh_defects(clean_meshes([two])[0]).components == 2
    assert MIN_COMPONENT_SHARE < 0.5


def test_expressions_sharing_a_topology_keep_sharing_it():
    raw = _messy()
    moved = raw.vertices * torch.tensor([1.0, 1.1, 1.0])
    moved[-1] += 1e-3  # the split vertex is coincident only in the neutral: a repair of its own would differ
    smile = Mesh(moved, raw.faces.clone())
    neutral, cleaned_smile = clean_meshes([raw, smile])
    assert torch.equal(neutral.faces, cleaned_smile.faces)
    assert neutral.vertices.shape == cleaned_smile.vertices.shape
    sel = clean_selection(raw)
    assert torch.allclose(cleaned_smile.vertices, smile.vertices[torch.from_numpy(sel.vertices)])


AXES = torch.tensor([0.6, 0.8, 0.7])


def _normal_error(mesh: Mesh) -> float:
    """Mean angle (degrees) between the face normals and the true ellipsoid's normals: stair-steps make it large."""
    import trimesh

    tm = trimesh.Trimesh(mesh.vertices.double().numpy(), mesh.faces.numpy(), process=False)
    g = tm.triangles_center / AXES.double().numpy() ** 2
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    return float(np.degrees(np.arccos(np.clip((tm.face_normals * g).sum(1), -1.0, 1.0))).mean())


def test_taubin_smoothing_removes_grid_steps_and_keeps_the_volume():
    import trimesh

    from idto3d.geometry.marching_tets import marching_tets
    from idto3d.geometry.tetgrid import make_tet_grid

    grid = make_tet_grid(24, 1.0)
    # An ellipsoid whose SDF only says inside/outside (the worst case of a field learnt on a grid): every
    # crossing lands mid-edge, so the surface is a staircase at the grid's spacing.
    p = grid.vertices
    inside = torch.linalg.norm(p / AXES, dim=1) < 1.0
    raw = clean_meshes([marching_tets(p, torch.where(inside, -0.01, 0.01), grid.tets).detach()])[0]
    smooth = clean_meshes([marching_tets(p, torch.where(inside, -0.01, 0.01), grid.tets).detach()], smooth=True)[0]
    vol = [trimesh.Trimesh(m.vertices.double().numpy(), m.faces.numpy(), process=False).volume for m in (raw, smooth)]
    err = [_normal_error(raw), _normal_error(smooth)]
    print(f"normal error {err[0]:.1f} -> {err[1]:.1f} degrees, volume {vol[0]:.4f} -> {vol[1]:.4f}")
    assert err[1] < 0.75 * err[0]
    assert vol[1] == pytest.approx(vol[0], rel=0.01)
    assert torch.equal(smooth.faces, raw.faces)
    assert torch.equal(taubin_smooth(raw).vertices, smooth.vertices)
