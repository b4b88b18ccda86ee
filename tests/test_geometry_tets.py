"""Claims about the tet grid and differentiable marching tetrahedra."""

from __future__ import annotations

import math

import pytest
import torch
import trimesh

from idto3d.core.errors import ConfigError
from idto3d.geometry.marching_tets import marching_tets
from idto3d.geometry.tetgrid import make_tet_grid
from idto3d.render.mesh import Mesh


def _tet_signed_volumes(vertices: torch.Tensor, tets: torch.Tensor) -> torch.Tensor:
    p = vertices.double()[tets]
    return torch.linalg.det(p[:, 1:] - p[:, :1]) / 6.0


def _mesh_volume(mesh: Mesh) -> torch.Tensor:
    v0, v1, v2 = (mesh.vertices[mesh.faces[:, i]] for i in range(3))
    return (v0 * torch.linalg.cross(v1, v2)).sum() / 6.0


def _edge_use_counts(faces: torch.Tensor) -> torch.Tensor:
    e = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e = torch.sort(e, dim=1).values
    key = e[:, 0] * (int(faces.max()) + 1) + e[:, 1]
    return torch.unique(key, return_counts=True)[1]


def _sphere(resolution: int, radius: float = 0.5, dtype=torch.float32):
    grid = make_tet_grid(resolution)
    verts = grid.vertices.to(dtype)
    return grid, verts, verts.norm(dim=-1) - radius


# --- tet grid -------------------------------------------------------------------------------

@pytest.mark.parametrize("resolution", [1, 3, 8])
def test_tet_grid_has_one_vertex_per_lattice_point_and_six_tets_per_cell(resolution):
    grid = make_tet_grid(resolution)
    assert grid.vertices.shape == ((resolution + 1) ** 3, 3)
    assert grid.tets.shape == (6 * resolution**3, 4)
    assert grid.vertices.dtype == torch.float32 and grid.tets.dtype == torch.int64
    # Shared vertices are deduplicated: every lattice point appears exactly once.
    assert torch.unique(grid.vertices, dim=0).shape[0] == grid.vertices.shape[0]


def test_tet_grid_spans_the_cube_and_reports_its_edge_length():
    grid = make_tet_grid(10, scale=0.7)
    assert torch.allclose(grid.vertices.min(0).values, torch.full((3,), -0.7))
    assert torch.allclose(grid.vertices.max(0).values, torch.full((3,), 0.7))
    assert grid.edge_length == pytest.approx(0.14)
    assert grid.to("cpu").tets.shape == grid.tets.shape


def test_every_tet_is_positively_oriented_and_they_fill_the_cube_exactly():
    grid = make_tet_grid(8, scale=0.7)
    vol = _tet_signed_volumes(grid.vertices, grid.tets)
    assert (vol > 0).all()
    assert vol.sum().item() == pytest.approx(1.4**3, rel=1e-5)


def test_tet_grid_is_conforming_every_inner_triangle_is_shared_by_two_tets():
    r = 5
    grid = make_tet_grid(r)
    tris = torch.cat([grid.tets[:, [0, 1, 2]], grid.tets[:, [0, 1, 3]],
                      grid.tets[:, [0, 2, 3]], grid.tets[:, [1, 2, 3]]])
    tris = torch.sort(tris, dim=1).values
    _, counts = torch.unique(tris, dim=0, return_counts=True)
    assert set(counts.tolist()) == {1, 2}
    # Only the cube's surface is unshared: 6 faces x r^2 squares x 2 triangles.
    assert int((counts == 1).sum()) == 12 * r * r


@pytest.mark.parametrize("resolution", [0, -4, 2.5, "64", True, None])
def test_bad_grid_resolution_raises_config_error_naming_it(resolution):
    with pytest.raises(ConfigError, match="resolution"):
        make_tet_grid(resolution)


@pytest.mark.parametrize("scale", [0, -1.0, float("nan")])
def test_bad_grid_scale_raises_config_error(scale):
    with pytest.raises(ConfigError, match="scale"):
        make_tet_grid(4, scale=scale)


# --- marching tets --------------------------------------------------------------------------

def test_sphere_at_grid_64_is_watertight_with_the_right_area_and_outward_normals():
    grid, verts, sdf = _sphere(64, radius=0.5)
    mesh = marching_tets(verts, sdf, grid.tets)
    v, f = mesh.vertices, mesh.faces
    assert f.dtype == torch.int64 and f.shape[1] == 3 and f.shape[0] > 10_000
    # Shared vertices: every surface vertex is used, none is duplicated.
    assert torch.unique(f).numel() == v.shape[0]
    # Every edge is shared by exactly two faces.
    assert (_edge_use_counts(f) == 2).all()
    tm = trimesh.Trimesh(v.detach().numpy(), f.numpy(), process=False)
    assert tm.is_watertight
    assert tm.area == pytest.approx(4 * math.pi * 0.25, rel=0.02)
    # Outward winding: positive signed volume, and each face normal points away from the centre.
    assert _mesh_volume(mesh).item() == pytest.approx(4 / 3 * math.pi * 0.125, rel=0.02)
    centroids = v[f].mean(1)
    assert ((mesh.face_normals(normalize=False) * centroids).sum(-1) > 0).float().mean() > 0.99
    # Surface vertices lie on the sphere to within a fraction of a cell.
    assert (v.norm(dim=-1) - 0.5).abs().max() < 0.25 * grid.edge_length


def test_vertices_lie_on_grid_edges_at_the_linear_zero_crossing():
    grid, verts, _ = _sphere(6)
    sdf = verts[:, 0] - 0.1234  # a plane: the crossing is exact for a linear sdf
    mesh = marching_tets(verts, sdf, grid.tets)
    assert torch.allclose(mesh.vertices[:, 0], torch.full((mesh.vertices.shape[0],), 0.1234))
    # The plane x = 0.1234 has its inside (x < 0.1234) at -x, so normals point +x.
    assert (mesh.face_normals()[:, 0] > 0.99).all()


def test_volume_gradient_to_sdf_matches_finite_differences():
    grid, verts, sdf = _sphere(8, dtype=torch.float64)
    sdf = sdf + 0.013 * torch.sin(7 * verts).sum(-1)  # make it generic
    sdf = sdf.clone().requires_grad_(True)
    vol = _mesh_volume(marching_tets(verts, sdf, grid.tets))
    vol.backward()
    # Probe vertices next to the surface (the gradient is zero elsewhere).
    probe = torch.nonzero(sdf.grad.abs() > 1e-4).flatten()[:5]
    assert probe.numel() == 5
    h = 1e-6
    for i in probe.tolist():
        plus, minus = sdf.detach().clone(), sdf.detach().clone()
        plus[i] += h
        minus[i] -= h
        fd = (_mesh_volume(marching_tets(verts, plus, grid.tets))
              - _mesh_volume(marching_tets(verts, minus, grid.tets))) / (2 * h)
        assert sdf.grad[i].item() == pytest.approx(fd.item(), rel=1e-4, abs=1e-9)
        # Raising the sdf (more "outside") shrinks the volume.
        assert sdf.grad[i] < 0


def test_mean_vertex_gradient_to_grid_positions_matches_finite_differences():
    grid, verts, sdf = _sphere(8, dtype=torch.float64)
    verts = verts.clone().requires_grad_(True)
    out = marching_tets(verts, sdf, grid.tets).vertices.mean(0).sum()
    out.backward()
    probe = torch.nonzero(verts.grad.abs().sum(-1) > 1e-6).flatten()[:3]
    assert probe.numel() == 3
    h = 1e-6
    for i in probe.tolist():
        for axis in range(3):
            plus, minus = verts.detach().clone(), verts.detach().clone()
            plus[i, axis] += h
            minus[i, axis] -= h
            fd = (marching_tets(plus, sdf, grid.tets).vertices.mean(0).sum()
                  - marching_tets(minus, sdf, grid.tets).vertices.mean(0).sum()) / (2 * h)
            assert verts.grad[i, axis].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-10)


@pytest.mark.parametrize("value", [1.0, -1.0])
def test_no_surface_gives_an_empty_mesh_that_still_backpropagates(value):
    grid = make_tet_grid(4)
    sdf = torch.full((grid.vertices.shape[0],), value, requires_grad=True)
    mesh = marching_tets(grid.vertices, sdf, grid.tets)
    assert mesh.vertices.shape == (0, 3) and mesh.faces.shape == (0, 3)
    assert mesh.faces.dtype == torch.int64
    mesh.vertices.sum().backward()
    assert torch.equal(sdf.grad, torch.zeros_like(sdf))


def test_equal_zero_and_tiny_sdf_values_give_finite_gradients():
    grid = make_tet_grid(4)
    n = grid.vertices.shape[0]
    g = torch.Generator().manual_seed(0)
    # Exact zeros, equal values and denormal-sized crossings all over the grid.
    choices = torch.tensor([0.0, -1e-38, 1e-38, -1e-30, 1e-20, 0.5, 0.5, -0.5])
    sdf = choices[torch.randint(len(choices), (n,), generator=g)].requires_grad_(True)
    verts = grid.vertices.clone().requires_grad_(True)
    mesh = marching_tets(verts, sdf, grid.tets)
    assert mesh.faces.shape[0] > 0
    (mesh.vertices.square().sum() + _mesh_volume(mesh)).backward()
    assert torch.isfinite(mesh.vertices).all()
    assert torch.isfinite(sdf.grad).all() and torch.isfinite(verts.grad).all()
