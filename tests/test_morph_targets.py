"""Expressions as glTF morph targets (export/morph.py) and the surface fit behind them (geometry/surface_fit.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pygltflib
import pytest
import torch
import trimesh
from gltf_checks import check_exported_glb, validate_glb
from typer.testing import CliRunner

from idto3d.cli import app
from idto3d.core.errors import IdtoError
from idto3d.export import PBRMaps, unwrap, write_glb
from idto3d.export.morph import morph_glb_bytes, write_morph_glb
from idto3d.geometry.surface_fit import closest_distances, fit_to_surface
from idto3d.geometry.template import build_head_template
from idto3d.identity.io import IdentityEmbedding, save_identity

TOL_M = 1e-6  # float32 metres: base + delta reproduces the expression's own .glb to well under a micrometre


def _maps(seed: int = 0) -> PBRMaps:
    rng = np.random.default_rng(seed)
    return PBRMaps.create(rng.random((16, 16, 3), dtype=np.float32), rng.random((16, 16), dtype=np.float32),
                          rng.random((16, 16), dtype=np.float32))


def _args(maps: PBRMaps):
    return maps.albedo, maps.roughness, maps.metallic, maps.normal


@pytest.fixture(scope="module")
def poses():
    """Three poses of one head layout: neutral, and two smooth, different deformations of it."""
    base = unwrap(build_head_template(24))
    v = base.vertices.astype(np.float64)
    wide = v * np.array([1.15, 1.0, 1.0])
    bulge = v + 0.05 * np.sin(3 * v[:, [1]]) * np.array([0.0, 0.0, 1.0])
    return {"neutral": base, "smile": base.with_positions(_welded(base, wide)),
            "mouth_open": base.with_positions(_welded(base, bulge))}


def _welded(uv, split_positions: np.ndarray) -> np.ndarray:
    out = np.zeros((int(uv.vmapping.max()) + 1, 3), np.float32)
    out[uv.vmapping] = split_positions
    return out


def _morph(path: Path, poses: dict) -> Path:
    base, *rest = poses
    return write_morph_glb(path, poses[base], {n: poses[n] for n in rest}, _maps())


def _targets(gltf: pygltflib.GLTF2) -> list[np.ndarray]:
    """The POSITION deltas of the one primitive's morph targets, in order."""
    out = []
    for t in gltf.meshes[0].primitives[0].targets:
        acc = gltf.accessors[t["POSITION"]]
        view = gltf.bufferViews[acc.bufferView]
        raw = gltf.binary_blob()[view.byteOffset: view.byteOffset + view.byteLength]
        out.append(np.frombuffer(raw, np.float32).reshape(acc.count, 3))
    return out


def _glb_positions(path: Path) -> np.ndarray:
    (tm,) = trimesh.load(path, process=False).geometry.values()
    return np.asarray(tm.vertices)


def gltf_faces(path: Path) -> np.ndarray:
    (tm,) = trimesh.load(path, process=False).geometry.values()
    return np.asarray(tm.faces)


def test_morph_glb_holds_each_expression_as_a_named_target(tmp_path, poses):
    path = _morph(tmp_path / "head.glb", poses)
    gltf = pygltflib.GLTF2().load(str(path))
    assert len(gltf.meshes) == 1 and len(gltf.meshes[0].primitives) == 1
    mesh = gltf.meshes[0]
    assert mesh.extras["targetNames"] == ["smile", "mouth_open"] and mesh.weights == [0.0, 0.0]
    assert all(set(t) == {"POSITION", "NORMAL"} for t in mesh.primitives[0].targets)
    base = _glb_positions(path)  # trimesh: the base mesh, loaded as any viewer would
    for name, delta in zip(["smile", "mouth_open"], _targets(gltf)):
        own = _glb_positions(write_glb(tmp_path / f"{name}.glb", poses[name], *_args(_maps())))
        np.testing.assert_allclose(base + delta, own, atol=TOL_M)
        assert np.abs(delta).max() > 1e-3  # a real displacement (millimetres), not a zero target


def test_morph_glb_uses_the_base_layout_and_refuses_another(tmp_path, poses):
    path = _morph(tmp_path / "head.glb", poses)
    (tm,) = trimesh.load(path, process=False).geometry.values()
    np.testing.assert_array_equal(np.asarray(tm.faces), poses["neutral"].faces)
    other = unwrap(build_head_template(16))
    with pytest.raises(IdtoError, match="smile"):
        morph_glb_bytes(poses["neutral"], {"smile": other}, _maps())


def test_morph_and_expression_glbs_pass_the_khronos_validator(tmp_path, poses):
    path = _morph(tmp_path / "head.glb", poses)
    check_exported_glb(path)  # trimesh + pygltflib + zero validator errors
    report = validate_glb(path)
    assert report["issues"]["numWarnings"] == 0, report["issues"]["messages"]
    check_exported_glb(write_glb(tmp_path / "smile.glb", poses["smile"], *_args(_maps())))


# ---- the surface fit


def _sphere_and_ellipsoid():
    s = trimesh.creation.icosphere(subdivisions=3)
    e = trimesh.creation.icosphere(subdivisions=4)
    return s, np.asarray(e.vertices) * np.array([1.3, 0.8, 1.0]), np.asarray(e.faces)


def test_a_sphere_fits_onto_an_ellipsoid_keeping_its_topology(tmp_path):
    s, ev, ef = _sphere_and_ellipsoid()
    before, _ = closest_distances(s.vertices, ev, ef)
    fit = fit_to_surface(s.vertices, s.faces, ev, ef)
    assert fit.vertices.shape == s.vertices.shape  # same vertices, faces untouched by construction
    assert before.max() > 0.2  # the surfaces start far apart (units of a unit sphere)...
    assert fit.distances.max() < 1e-3 and fit.distances.mean() < 2e-4  # ...and end on each other
    err = fit.error_mm(metres_per_unit=0.2)
    assert err["mean_mm"] <= err["p95_mm"] <= err["max_mm"] < 0.2
    # Not folded: every triangle keeps its orientation (outward normals stay outward).
    normals = trimesh.Trimesh(fit.vertices, s.faces, process=False).face_normals
    assert (np.einsum("ij,ij->i", normals, s.face_normals) > 0.5).all()


def _flipped(vertices: np.ndarray, faces: np.ndarray, ref: np.ndarray) -> int:
    n = trimesh.Trimesh(vertices, faces, process=False).face_normals
    return int((np.einsum("ij,ij->i", n, ref) <= 0.0).sum())


def test_the_smoothness_term_keeps_a_fit_onto_sharp_corners_from_folding():
    # Closest points on a cube pile the sphere's vertices onto its edges and corners: without the Laplacian
    # term triangles collapse or flip there; with it the fit stays a surface.
    s = trimesh.creation.icosphere(subdivisions=3)
    cube = trimesh.creation.box(extents=[1.2, 1.2, 1.2]).subdivide().subdivide()
    raw = fit_to_surface(s.vertices, s.faces, cube.vertices, cube.faces, iterations=1, smoothness=0.0)
    smooth = fit_to_surface(s.vertices, s.faces, cube.vertices, cube.faces, smoothness=10.0, final_ratio=0.05)
    ref = s.face_normals
    area = lambda v: trimesh.Trimesh(v, s.faces, process=False).area_faces
    assert _flipped(raw.vertices, s.faces, ref) + int((area(raw.vertices) < 1e-6).sum()) > 0
    assert _flipped(smooth.vertices, s.faces, ref) == 0 and area(smooth.vertices).min() > 1e-6
    assert smooth.distances.mean() < 0.02


def test_surface_fit_rejects_bad_input():
    s = trimesh.creation.icosphere(subdivisions=1)
    with pytest.raises(IdtoError):
        fit_to_surface(s.vertices, s.faces, s.vertices, np.zeros((0, 3), np.int64))
    with pytest.raises(IdtoError):
        fit_to_surface(s.vertices, s.faces, s.vertices, s.faces, iterations=0)


# ---- the run's export


FAST = ["template.iterations=100", "template.points_per_step=1000", "template.build_resolution=32",
        "geometry.grid_resolution=16", "render.resolution=64", "export.turntable_views=2",
        "export.turntable_resolution=64", "export.video=false", "export.texture_size=64"]


def _generate(tmp_path: Path, extra: list[str]) -> Path:
    ident = tmp_path / "id.safetensors"
    emb = torch.nn.functional.normalize(torch.randn(128, generator=torch.Generator().manual_seed(0)), dim=0)
    # Its photo (x.jpg) is not at hand: no face fit, the template fit is exported (one DMTet mesh per expression).
    save_identity(ident, IdentityEmbedding(emb, emb[None].clone(), torch.ones(1, dtype=torch.bool),
                                           torch.tensor([[0., 0, 10, 10]]), torch.zeros(1, 5, 2), "dlib",
                                           photos=[{"path": "x.jpg", "quality": "ok"}]))
    run = tmp_path / "run"
    args = [a for x in FAST + extra for a in ("--set", x)]
    result = CliRunner().invoke(app, ["generate", str(ident), "--out", str(run), "--expressions", "neutral,smile",
                                      *args])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "wrote 2 GLB heads" in out and ("morph targets" in out) == ("export.morph_targets=false" not in extra)
    return run


def test_a_run_exports_the_morph_glb_fitted_across_topologies(tmp_path):
    run = _generate(tmp_path, [])
    morph = run / "export" / "morph" / "head.glb"
    done = json.loads((run / "export" / "done.json").read_text())
    assert "export/morph/head.glb" in done["files"]
    gltf = pygltflib.GLTF2().load(str(morph))
    assert gltf.meshes[0].extras["targetNames"] == ["smile"]
    base = _glb_positions(morph)
    fitted = base + _targets(gltf)[0]
    (sm,) = trimesh.load(run / "export" / "smile.glb", process=False).geometry.values()
    smile_v, smile_f = np.asarray(sm.vertices), np.asarray(sm.faces)
    (ne,) = trimesh.load(run / "export" / "neutral.glb", process=False).geometry.values()
    # one DMTet mesh per expression: the neutral mesh had to be fitted (their topologies differ)
    assert len(smile_v) != len(ne.vertices) or not np.array_equal(smile_f, np.asarray(ne.faces))
    err = json.loads((run / "export" / "morph" / "morph_fit.json").read_text())["expressions"]["smile"]
    # The recorded error is what the file holds: the targets' distance to smile's own .glb surface, in mm.
    dist_mm = closest_distances(fitted, smile_v, smile_f)[0] * 1000.0
    before_mm = closest_distances(base, smile_v, smile_f)[0] * 1000.0
    assert dist_mm.max() == pytest.approx(err["max_mm"], rel=0.02, abs=1e-3)
    assert dist_mm.mean() == pytest.approx(err["mean_mm"], rel=0.02, abs=1e-3)
    assert np.percentile(dist_mm, 95) == pytest.approx(err["p95_mm"], rel=0.02, abs=1e-3)
    assert err["max_mm"] < 0.1 * before_mm.max()  # the fit moved the neutral onto the smile
    back_mm = closest_distances(smile_v, fitted, np.asarray(gltf_faces(morph)))[0] * 1000.0
    assert back_mm.max() == pytest.approx(err["expression_to_fit_max_mm"], rel=0.02, abs=1e-3)
    assert err["expression_to_fit_p95_mm"] < 0.5 * np.percentile(before_mm, 95) + 0.05
    check_exported_glb(morph)


def test_morph_targets_off_writes_no_morph_glb(tmp_path):
    run = _generate(tmp_path, ["export.morph_targets=false"])
    assert (run / "export" / "smile.glb").exists() and not (run / "export" / "morph").exists()


def test_offline_heads_share_one_layout_and_become_exact_morph_targets(tmp_path):
    """The offline path: the stitched heads share faces and UVs, so the targets are the heads themselves."""
    from idto3d.core.config import load_config
    from idto3d.face_model.morphable_model import load_morphable_model
    from idto3d.geometry.face_merge import placement
    from idto3d.stages.export_stage import export_run, grey_maps
    from idto3d.stages.offline_head import stitched_heads

    model = load_morphable_model()
    names = ["neutral", "smile", "mouth_open"]
    heads, atlases, _, _ = stitched_heads(model, None, placement(model.mean, model.landmarks),
                                       build_head_template(32), names)
    cfg = load_config("preview", None, ["export.turntable_views=1", "export.turntable_resolution=32",
                                        "export.video=false"])
    export_run(tmp_path, cfg, dict(zip(heads, atlases)), lambda i, n, a: grey_maps(), progress=False)
    morph = tmp_path / "export" / "morph" / "head.glb"
    assert not (tmp_path / "export" / "morph" / "morph_fit.json").exists()  # no fit: the layouts are one
    gltf = pygltflib.GLTF2().load(str(morph))
    assert gltf.meshes[0].extras["targetNames"] == ["smile", "mouth_open"]
    base = _glb_positions(morph)
    for name, delta in zip(["smile", "mouth_open"], _targets(gltf)):
        np.testing.assert_allclose(base + delta, _glb_positions(tmp_path / "export" / f"{name}.glb"), atol=TOL_M)
    assert np.abs(_targets(gltf)[1]).max() > 0.01  # mouth_open moves the jaw by centimetres
    check_exported_glb(morph)
