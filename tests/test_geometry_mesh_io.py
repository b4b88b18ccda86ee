"""Mesh files: lossless round trips, and every broken input becomes a MeshError that says what to do."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from idto3d.core.errors import IdtoError, MeshError
from idto3d.geometry.mesh_io import MeshWarning, load_mesh, mesh_stats, save_mesh, validate_mesh
from idto3d.render.mesh import Mesh


def _sphere(subdivisions: int = 2) -> Mesh:
    import trimesh

    s = trimesh.creation.icosphere(subdivisions=subdivisions)
    return Mesh(torch.tensor(s.vertices, dtype=torch.float32), torch.tensor(s.faces, dtype=torch.int64))


@pytest.mark.parametrize("suffix", [".obj", ".ply"])
def test_save_then_load_round_trips_exactly(tmp_path, suffix: str) -> None:
    m = _sphere()
    path = save_mesh(m, tmp_path / f"sphere{suffix}")
    back = load_mesh(path)
    assert torch.equal(back.faces, m.faces)
    assert torch.equal(back.vertices, m.vertices)
    assert back.vertices.dtype == torch.float32 and back.faces.dtype == torch.int64


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path) -> None:
    save_mesh(_sphere(), tmp_path / "a.obj")
    save_mesh(_sphere(1), tmp_path / "a.obj")  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.obj"]
    assert load_mesh(tmp_path / "a.obj").faces.shape[0] == 80


def test_save_refuses_unknown_extension(tmp_path) -> None:
    with pytest.raises(MeshError, match=r"\.obj or \.ply"):
        save_mesh(_sphere(), tmp_path / "a.fbx")


def test_missing_file_is_reported_with_its_path(tmp_path) -> None:
    with pytest.raises(MeshError, match="not found") as err:
        load_mesh(tmp_path / "nope.obj")
    assert "nope.obj" in str(err.value)
    assert isinstance(err.value, IdtoError)


@pytest.mark.parametrize("suffix", [".obj", ".ply", ".stl", ".glb", ".off"])
def test_corrupt_file_is_reported_not_a_traceback(tmp_path, suffix: str) -> None:
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)))
    with pytest.raises(MeshError, match="corrupt") as err:
        load_mesh(path)
    # No chained library traceback behind the one-line message.
    assert err.value.__cause__ is None
    assert err.value.__suppress_context__ or err.value.__context__ is None


def test_text_that_is_not_a_mesh_is_reported(tmp_path) -> None:
    path = tmp_path / "notes.obj"
    path.write_text("these are my notes\nnot a mesh\n")
    with pytest.raises(MeshError, match="no triangle mesh"):
        load_mesh(path)


def test_unsupported_extension_is_reported(tmp_path) -> None:
    path = tmp_path / "head.fbx"
    path.write_bytes(b"x")
    with pytest.raises(MeshError, match="unsupported mesh format"):
        load_mesh(path)


def test_empty_mesh_is_reported(tmp_path) -> None:
    (tmp_path / "zero.obj").write_bytes(b"")
    with pytest.raises(MeshError, match="empty"):
        load_mesh(tmp_path / "zero.obj")
    (tmp_path / "points.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    with pytest.raises(MeshError, match="not a triangle mesh"):
        load_mesh(tmp_path / "points.obj")
    with pytest.raises(MeshError, match="empty"):
        validate_mesh(Mesh(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int64)))


def test_nan_vertices_are_reported(tmp_path) -> None:
    path = tmp_path / "nan.obj"
    path.write_text("v 0 0 0\nv 1 0 0\nv nan 1 0\nv 0 0 1\nf 1 2 3\nf 1 3 4\n")
    with pytest.raises(MeshError, match="1 vertices with NaN"):
        load_mesh(path)
    m = _sphere()
    m.vertices[5, 1] = float("inf")
    with pytest.raises(MeshError, match="NaN or infinite"):
        validate_mesh(m)


def test_only_degenerate_faces_are_reported() -> None:
    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [2, 0, 0]])
    with pytest.raises(MeshError, match="degenerate"):
        validate_mesh(Mesh(v, torch.tensor([[0, 1, 2], [2, 1, 0]])))


def test_three_triangles_on_one_edge_are_non_manifold() -> None:
    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0.5, 1, 0], [0.5, -1, 0], [0.5, 0, 1]])
    f = torch.tensor([[0, 1, 2], [1, 0, 3], [0, 1, 4]])
    with pytest.raises(MeshError, match="not a manifold: 1 edges are shared by more than two faces"):
        validate_mesh(Mesh(v, f), require_watertight=False)


def test_open_mesh_reports_its_boundary_edges_and_a_fix(tmp_path) -> None:
    m = _sphere()
    open_mesh = Mesh(m.vertices, m.faces[1:])
    with pytest.raises(MeshError, match="not watertight: 3 boundary edges") as err:
        validate_mesh(open_mesh, name="my head")
    assert "my head" in str(err.value) and "Close Holes" in str(err.value)
    validate_mesh(open_mesh, require_watertight=False)  # fine when holes are allowed


def test_inverted_mesh_is_flipped_with_a_warning() -> None:
    m = _sphere()
    inverted = Mesh(m.vertices, m.faces[:, [0, 2, 1]])
    assert mesh_stats(inverted)["signed_volume"] < 0
    with pytest.warns(MeshWarning, match="inside-out"):
        fixed = validate_mesh(inverted)
    assert fixed is inverted  # fixed in place as well as returned
    assert mesh_stats(inverted)["signed_volume"] > 0
    assert torch.equal(inverted.faces, m.faces)


def test_inconsistently_wound_faces_are_reoriented() -> None:
    m = _sphere()
    f = m.faces.clone()
    f[::7] = f[::7][:, [0, 2, 1]]
    with pytest.warns(MeshWarning, match="inconsistently wound"):
        fixed = validate_mesh(Mesh(m.vertices, f))
    assert torch.equal(fixed.faces, m.faces)


def test_good_mesh_passes_silently() -> None:
    m = _sphere()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert validate_mesh(m) is m


def test_scene_with_several_meshes_is_concatenated_with_a_warning(tmp_path) -> None:
    import trimesh

    a = trimesh.creation.icosphere(subdivisions=1)
    b = trimesh.creation.icosphere(subdivisions=1)
    b.apply_translation([3.0, 0, 0])
    scene = trimesh.Scene([a, b])
    path = tmp_path / "two.glb"
    path.write_bytes(scene.export(file_type="glb"))
    with pytest.warns(MeshWarning, match="2 meshes"):
        m = load_mesh(path)
    assert m.faces.shape[0] == 160
    assert float(m.vertices[:, 0].max()) == pytest.approx(4.0, abs=1e-5)


def test_obj_with_uv_seams_loads_as_closed(tmp_path) -> None:
    # A cube whose vertices are split per face by UVs must still read as one closed surface.
    import trimesh

    cube = trimesh.creation.box()
    lines = [f"v {x} {y} {z}" for x, y, z in cube.vertices] + ["vt 0 0", "vt 1 0", "vt 0 1"]
    lines += [f"f {a + 1}/1 {b + 1}/2 {c + 1}/3" for a, b, c in cube.faces]
    (tmp_path / "cube.obj").write_text("\n".join(lines) + "\n")
    m = load_mesh(tmp_path / "cube.obj")
    assert m.vertices.shape[0] == 8
    assert mesh_stats(m)["watertight"]


def test_weld_degenerate_makes_marching_tets_output_unwrappable_and_keeps_it_closed():
    """SDF zeros exactly on grid vertices (a cube through them) make marching tets emit collapsed faces, which
    xatlas refuses; welding keeps the surface closed with the same area and lets the run's unwrap through."""
    import trimesh

    from idto3d.texture.uv_atlas import UnwrapError, unwrap
    from idto3d.geometry.marching_tets import marching_tets
    from idto3d.geometry.mesh_io import weld_degenerate
    from idto3d.geometry.tetgrid import make_tet_grid
    from idto3d.stages.texture_stage import unwrap_expressions

    grid = make_tet_grid(16, 1.0)
    raw = marching_tets(grid.vertices, grid.vertices.abs().amax(1) - 0.5, grid.tets).detach()
    with pytest.raises(UnwrapError, match="zero area"):
        unwrap(raw)
    welded = weld_degenerate(raw)
    before = trimesh.Trimesh(raw.vertices.numpy(), raw.faces.numpy(), process=False)
    after = trimesh.Trimesh(welded.vertices.numpy(), welded.faces.numpy(), process=False)
    assert after.is_watertight and len(after.faces) < len(before.faces)
    assert after.area == pytest.approx(before.area, rel=1e-6)
    atlases = unwrap_expressions({"neutral": raw})
    assert atlases["neutral"].faces.shape[0] == len(after.faces)
