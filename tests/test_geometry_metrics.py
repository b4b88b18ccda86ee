"""Surface sampling, Chamfer distance and signed distances to meshes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idto3d.core.errors import MeshError
from idto3d.geometry.metrics import SurfaceIndex, bbox_diagonal, chamfer_distance, sample_surface, surface_distances
from idto3d.geometry.sdf import mesh_sdf, sample_sdf_training_points
from idto3d.render.mesh import Mesh


def _sphere(radius: float = 1.0, subdivisions: int = 4) -> Mesh:
    import trimesh

    s = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return Mesh(torch.tensor(s.vertices, dtype=torch.float32), torch.tensor(s.faces, dtype=torch.int64))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- sampling ------------------------------------------------------------------------------------


def test_surface_samples_lie_on_the_surface_and_are_area_weighted() -> None:
    # Two unit squares side by side, one split into 2 triangles and one into 8 small ones: equal
    # areas must get equal numbers of samples whatever the triangle count.
    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [2, 0, 0], [2, 1, 0]])
    f = torch.tensor([[0, 1, 2], [0, 2, 3], [1, 4, 5], [1, 5, 2]])
    pts = sample_surface(Mesh(v, f), 20000, _gen())
    assert pts.shape == (20000, 3) and torch.all(pts[:, 2] == 0)
    assert 0.47 < float((pts[:, 0] < 1).float().mean()) < 0.53
    assert pts[:, :2].min() >= 0 and pts[:, 0].max() <= 2 and pts[:, 1].max() <= 1


def test_surface_samples_are_deterministic_under_a_generator() -> None:
    m = _sphere(subdivisions=2)
    assert torch.equal(sample_surface(m, 500, _gen(3)), sample_surface(m, 500, _gen(3)))
    assert not torch.equal(sample_surface(m, 500, _gen(3)), sample_surface(m, 500, _gen(4)))


# --- chamfer -------------------------------------------------------------------------------------


def test_chamfer_of_a_mesh_with_itself_is_about_zero() -> None:
    m = _sphere()
    # Distances go to the other mesh's triangles, not its samples, so there is no sampling floor.
    assert chamfer_distance(m, m, generator=_gen()) < 1e-6
    assert chamfer_distance(m.vertices, m.vertices) == 0.0  # identical point sets


def test_chamfer_of_concentric_spheres_is_the_radius_gap() -> None:
    d = chamfer_distance(_sphere(1.0), _sphere(0.7), generator=_gen())
    assert d == pytest.approx(0.3, abs=0.01)


def test_chamfer_is_scale_equivariant_and_symmetric() -> None:
    a, b = _sphere(1.0), _sphere(0.8, subdivisions=3)
    b = Mesh(b.vertices + torch.tensor([0.1, 0.0, 0.0]), b.faces)
    d = chamfer_distance(a, b, generator=_gen())
    scaled = chamfer_distance(Mesh(a.vertices * 3, a.faces), Mesh(b.vertices * 3, b.faces), generator=_gen())
    assert scaled == pytest.approx(3 * d, rel=1e-4)
    assert chamfer_distance(b, a, generator=_gen()) == pytest.approx(d, rel=0.05)


def test_chamfer_of_point_sets_without_scipy_matches_the_kd_tree(monkeypatch) -> None:
    import builtins

    a = sample_surface(_sphere(1.0, 2), 3000, _gen(1))
    b = sample_surface(_sphere(0.5, 2), 2000, _gen(2))
    with_tree = chamfer_distance(a, b)
    assert with_tree == pytest.approx(0.5, abs=0.02)
    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    assert chamfer_distance(a, b) == pytest.approx(with_tree, rel=1e-9)


def test_a_surface_index_gives_the_meshes_distances_bit_for_bit() -> None:
    a, b = _sphere(1.0, 3), _sphere(1.1, 2)
    q = torch.randn(500, 3, generator=_gen(1))
    index = SurfaceIndex(b)
    import igl  # the one-shot libigl query, the reference the index must reproduce

    sq = igl.point_mesh_squared_distance(q.double().numpy(), b.vertices.double().numpy(), b.faces.numpy())[0]
    assert torch.equal(index.distances(q), torch.from_numpy(np.sqrt(np.maximum(sq, 0.0))))
    assert torch.equal(surface_distances(q, index), surface_distances(q, b))
    assert float(index.distances(b.vertices).abs().max()) < 1e-6
    plain = chamfer_distance(a, b, 2000, _gen())
    assert chamfer_distance(SurfaceIndex(a), index, 2000, _gen()) == plain
    assert chamfer_distance(a, index, 2000, _gen()) == plain


def test_bbox_diagonal() -> None:
    v = torch.tensor([[0.0, 0, 0], [1, 2, 2]])
    assert bbox_diagonal(v) == pytest.approx(3.0)
    assert bbox_diagonal(_sphere()) == pytest.approx(2 * 3**0.5, rel=1e-3)


def test_sampling_a_mesh_without_faces_is_an_error() -> None:
    with pytest.raises(MeshError, match="no faces"):
        sample_surface(Mesh(torch.zeros(3, 3), torch.zeros(0, 3, dtype=torch.int64)), 10)


# --- signed distance -----------------------------------------------------------------------------


def test_sphere_sdf_matches_the_analytic_distance_and_is_negative_inside() -> None:
    r = 0.6
    m = _sphere(r, subdivisions=5)
    p = (torch.rand(5000, 3, generator=_gen()) * 2 - 1) * 1.2
    sdf = mesh_sdf(m, p)
    exact = p.norm(dim=-1) - r
    # The icosphere's flat facets sit inside the true sphere by ~edge^2 / (8 r) ~ 1e-4.
    assert float((sdf - exact).abs().max()) < 5e-4
    assert sdf.dtype == torch.float32
    assert float(mesh_sdf(m, torch.zeros(1, 3))) == pytest.approx(-r, abs=2e-3)


def test_mesh_sdf_chunks_give_the_same_answer() -> None:
    m = _sphere(0.5, 2)
    p = torch.rand(1000, 3, generator=_gen()) * 2 - 1
    assert torch.equal(mesh_sdf(m, p), mesh_sdf(m, p, chunk=97))


def test_training_samples_are_deterministic_and_concentrate_near_the_surface() -> None:
    m = _sphere(0.5, 3)
    p1, s1 = sample_sdf_training_points(m, 4000, 1000, generator=_gen(7))
    p2, s2 = sample_sdf_training_points(m, 4000, 1000, generator=_gen(7))
    assert torch.equal(p1, p2) and torch.equal(s1, s2)
    assert p1.shape == (5000, 3) and s1.shape == (5000,)
    assert p1.abs().max() <= 1.0
    near = s1[:4000].abs()
    # Half the surface samples use sigma 0.01, half 0.05.
    assert float(near[:2000].median()) < 0.012 and 0.015 < float(near[2000:].median()) < 0.05
    # The volume samples see both signs.
    assert (s1[4000:] < 0).any() and (s1[4000:] > 0).any()
    p3, _ = sample_sdf_training_points(m, 4000, 1000, generator=_gen(8))
    assert not torch.equal(p1, p3)
