"""Claims about the uniform Laplacian regulariser."""

from __future__ import annotations

import pytest
import torch
import trimesh

from idto3d.geometry.laplacian import laplacian_loss, mesh_edges
from idto3d.render.mesh import Mesh


def _icosphere(subdivisions: int = 3) -> Mesh:
    s = trimesh.creation.icosphere(subdivisions=subdivisions, radius=1.0)
    return Mesh(torch.tensor(s.vertices, dtype=torch.float64),
                torch.tensor(s.faces, dtype=torch.int64))


def _flat_grid(n: int = 6) -> Mesh:
    """An n x n vertex regular grid in the z = 0 plane, every square cut along the same diagonal."""
    ij = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij"), -1)
    verts = torch.cat([ij.reshape(-1, 2).double(), torch.zeros(n * n, 1, dtype=torch.float64)], 1)
    faces = []
    for i in range(n - 1):
        for j in range(n - 1):
            a, b, c, d = i * n + j, (i + 1) * n + j, (i + 1) * n + j + 1, i * n + j + 1
            faces += [[a, b, c], [a, c, d]]
    return Mesh(verts, torch.tensor(faces, dtype=torch.int64))


def _reference_loss(mesh: Mesh) -> float:
    nbrs: dict[int, set[int]] = {}
    for f in mesh.faces.tolist():
        for a, b in ((f[0], f[1]), (f[1], f[2]), (f[2], f[0])):
            nbrs.setdefault(a, set()).add(b)
            nbrs.setdefault(b, set()).add(a)
    v = mesh.vertices.detach()
    terms = [float(((v[i] - v[sorted(ns)].mean(0)) ** 2).sum()) for i, ns in nbrs.items()]
    return sum(terms) / len(terms)


def test_mesh_edges_are_unique_sorted_undirected_pairs():
    tet = torch.tensor([[0, 2, 1], [0, 1, 3], [1, 2, 3], [0, 3, 2]])
    edges = mesh_edges(tet)
    assert edges.tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    sphere = _icosphere(2)
    # Closed triangle mesh: E = 3F / 2.
    assert mesh_edges(sphere.faces).shape == (sphere.faces.shape[0] * 3 // 2, 2)
    assert mesh_edges(torch.zeros((0, 3), dtype=torch.int64)).shape == (0, 2)


def test_laplacian_matches_a_per_vertex_reference():
    mesh = _icosphere(1)
    g = torch.Generator().manual_seed(0)
    mesh = Mesh(mesh.vertices + 0.05 * torch.randn(mesh.vertices.shape, generator=g,
                                                     dtype=torch.float64), mesh.faces)
    assert laplacian_loss(mesh).item() == pytest.approx(_reference_loss(mesh), rel=1e-10)


def test_flat_regular_grid_interior_is_a_stationary_point():
    mesh = _flat_grid(6)
    v = mesh.vertices.clone().requires_grad_(True)
    laplacian_loss(Mesh(v, mesh.faces)).backward()
    # Out-of-plane gradient is zero everywhere on a flat mesh, so smoothing never bends it...
    assert torch.allclose(v.grad[:, 2], torch.zeros(36, dtype=torch.float64))
    # ...and lifting an interior vertex costs something, growing quadratically.
    interior = 2 * 6 + 3
    lifted = []
    for h in (0.1, 0.2):
        w = mesh.vertices.clone()
        w[interior, 2] = h
        lifted.append(laplacian_loss(Mesh(w, mesh.faces)) - laplacian_loss(mesh))
    assert lifted[0] > 0
    assert (lifted[1] / lifted[0]).item() == pytest.approx(4.0, rel=1e-9)


def test_noisy_sphere_scores_higher_than_the_smooth_one():
    mesh = _icosphere(3)
    g = torch.Generator().manual_seed(0)
    noise = 0.02 * torch.randn(mesh.vertices.shape, generator=g, dtype=torch.float64)
    noisy = Mesh(mesh.vertices + noise, mesh.faces)
    assert laplacian_loss(noisy) > 5 * laplacian_loss(mesh)


def test_gradient_descent_on_the_loss_smooths_a_noisy_sphere():
    mesh = _icosphere(2)
    g = torch.Generator().manual_seed(1)
    v = (mesh.vertices + 0.03 * torch.randn(mesh.vertices.shape, generator=g,
                                            dtype=torch.float64)).requires_grad_(True)
    start = laplacian_loss(Mesh(v, mesh.faces)).item()
    # The loss is a mean over vertices, so per-vertex gradients scale as 1/V.
    opt = torch.optim.SGD([v], lr=0.1 * v.shape[0])
    for _ in range(20):
        loss = laplacian_loss(Mesh(v, mesh.faces))
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(v.grad).all()
        opt.step()
    # Part of the loss is the sphere's own curvature, so it cannot reach zero in a few steps.
    assert laplacian_loss(Mesh(v, mesh.faces)).item() < start / 2


def test_loss_scales_with_the_square_of_mesh_size():
    mesh = _icosphere(2)
    bumpy = Mesh(mesh.vertices * (1 + 0.1 * torch.sin(5 * mesh.vertices[:, :1])), mesh.faces)
    doubled = Mesh(bumpy.vertices * 2, mesh.faces)
    assert laplacian_loss(doubled).item() == pytest.approx(4 * laplacian_loss(bumpy).item())


def test_empty_mesh_gives_zero_with_a_graph():
    v = torch.zeros((0, 3), requires_grad=True)
    loss = laplacian_loss(Mesh(v, torch.zeros((0, 3), dtype=torch.int64)))
    assert loss.item() == 0.0
    loss.backward()
    assert v.grad is not None and v.grad.shape == (0, 3)
