"""The built-in head template: a closed, outward, symmetric head with a neck and a nose."""

from __future__ import annotations

import pytest
import torch

from idto3d.core.errors import MeshError
from idto3d.geometry import template as template_mod
from idto3d.geometry.mesh_io import mesh_stats, save_mesh
from idto3d.geometry.sdf import mesh_sdf
from idto3d.core.units import METRES_PER_UNIT
from idto3d.geometry.template import (
    TEMPLATE_HEIGHT, build_head_template, head_template_sdf, load_template, template_metadata,
)
from idto3d.render.mesh import Mesh


@pytest.fixture(scope="module")
def head() -> Mesh:
    return build_head_template(96)


def _icosphere(radius: float = 1.0, subdivisions: int = 3) -> Mesh:
    import trimesh

    s = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return Mesh(torch.tensor(s.vertices, dtype=torch.float32), torch.tensor(s.faces, dtype=torch.int64))


def test_template_is_a_closed_outward_manifold(head: Mesh) -> None:
    stats = mesh_stats(head)
    assert stats["faces"] > 10_000
    assert stats["boundary_edges"] == 0, "template has holes"
    assert stats["nonmanifold_edges"] == 0
    assert stats["signed_volume"] > 0, "faces point inward"
    # Face normals agree with the SDF gradient: stepping along them leaves the head.
    some = torch.arange(0, head.faces.shape[0], 17)
    sub = Mesh(head.vertices, head.faces[some])
    outside = head_template_sdf(sub.vertices[sub.faces].mean(1) + 0.01 * sub.face_normals())
    assert (outside > 0).float().mean() > 0.99


def test_template_fits_inside_the_working_box(head: Mesh) -> None:
    v = head.vertices
    assert v.abs().max() <= 0.85
    height = float(v[:, 1].max() - v[:, 1].min())
    assert height == pytest.approx(TEMPLATE_HEIGHT, abs=0.03)
    # Centred: the bounding box's middle is near the origin on every axis.
    assert ((v.max(0).values + v.min(0).values) / 2).abs().max() < 0.03


def test_template_is_left_right_symmetric(head: Mesh) -> None:
    mirrored = head.vertices * torch.tensor([-1.0, 1.0, 1.0])
    # Every mirrored vertex lies on the original surface, up to the marching-tets discretisation.
    gap = mesh_sdf(head, mirrored).abs()
    cell = 2.0 / 96
    assert float(gap.max()) < 0.5 * cell
    pts = torch.rand(2000, 3, generator=torch.Generator().manual_seed(0)) * 1.7 - 0.85
    assert torch.equal(head_template_sdf(pts), head_template_sdf(pts * torch.tensor([-1.0, 1.0, 1.0])))


def test_template_is_deterministic_and_callers_get_their_own_copy() -> None:
    a = build_head_template(40)
    # Bypass the per-process cache to really build twice.
    vertices, faces = template_mod._build_arrays.__wrapped__(40)
    assert torch.equal(a.vertices, vertices) and torch.equal(a.faces, faces)
    a.vertices.add_(1.0)
    a.faces.zero_()
    again = build_head_template(40)
    assert torch.equal(again.vertices, vertices) and torch.equal(again.faces, faces)


def test_template_has_a_neck_narrower_than_the_head(head: Mesh) -> None:
    v = head.vertices
    bottom = v[v[:, 1] < v[:, 1].min() + 0.1]
    head_width = float(v[:, 0].max() - v[:, 0].min())
    neck_width = float(bottom[:, 0].max() - bottom[:, 0].min())
    assert neck_width < 0.75 * head_width
    # The bottom is a closed cap: some faces there point straight down.
    normals = head.face_normals()
    low = head.vertices[head.faces].mean(1)[:, 1] < v[:, 1].min() + 0.01
    assert (normals[low][:, 1] < -0.9).any()


def test_template_nose_is_the_frontmost_point_near_the_face_centre(head: Mesh) -> None:
    v = head.vertices
    tip = v[v[:, 2].argmax()]
    assert abs(float(tip[0])) < 0.02
    # Between the chin and the brow, i.e. in the middle third of the head's height.
    assert -0.25 < float(tip[1]) < 0.2
    # And it sticks out: the frontmost point 0.15 to the side (3 cm, the cheeks) is well behind it.
    cheek = v[(v[:, 0] - 0.15).abs() < 0.01]
    assert float(cheek[:, 2].max()) < float(tip[2]) - 0.08


def test_template_sdf_is_approximately_metric_near_the_surface(head: Mesh) -> None:
    g = torch.Generator().manual_seed(1)
    on_surface = head.vertices[torch.randint(0, head.vertices.shape[0], (3000,), generator=g)]
    near = on_surface + 0.03 * torch.randn(3000, 3, generator=g)
    exact = mesh_sdf(head, near)
    analytic = head_template_sdf(near)
    assert (analytic < 0).eq(exact < 0)[exact.abs() > 0.01].all()
    assert float((analytic - exact).abs().mean()) < 0.01
    assert float(head_template_sdf(torch.zeros(1, 3))) < -0.2
    assert float(head_template_sdf(torch.full((1, 3), 0.95))) > 0.2


def test_template_metadata_documents_metres_per_unit() -> None:
    meta = template_metadata()
    assert meta["metres_per_unit"] == METRES_PER_UNIT
    # A real head and neck is about a third of a metre tall.
    assert 0.25 < TEMPLATE_HEIGHT * METRES_PER_UNIT < 0.4


def test_load_template_builtin(head: Mesh) -> None:
    for spec in (None, "builtin"):
        t = load_template(spec)
        assert torch.equal(t.vertices, head.vertices)


def test_load_template_normalises_a_user_mesh_without_rotating_it(tmp_path) -> None:
    box = _icosphere(1.0, 2)
    v = box.vertices * torch.tensor([0.1, 0.2, 0.15]) + torch.tensor([3.0, -1.0, 2.0])
    path = tmp_path / "user_head.obj"
    save_mesh(Mesh(v, box.faces), path)
    t = load_template(path)
    lo, hi = t.vertices.min(0).values, t.vertices.max(0).values
    assert torch.allclose((lo + hi) / 2, torch.zeros(3), atol=1e-5)
    extent = hi - lo
    assert float(extent.max()) == pytest.approx(1.6, abs=1e-4)
    assert float(extent[1]) == pytest.approx(1.6, abs=1e-4)  # y stayed the longest axis
    assert float(extent[0]) == pytest.approx(0.8, abs=1e-3)


def test_load_template_refuses_an_open_user_mesh(tmp_path) -> None:
    s = _icosphere()
    path = tmp_path / "open.ply"
    save_mesh(Mesh(s.vertices, s.faces[1:]), path)
    with pytest.raises(MeshError, match="not watertight"):
        load_template(path)


def test_build_head_template_rejects_a_tiny_resolution() -> None:
    with pytest.raises(MeshError, match="resolution"):
        build_head_template(4)
