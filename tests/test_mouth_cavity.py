"""The offline heads' mouth cavity (``geometry.mouth_cavity``, ``texture.mouth``): an open mouth's strip between the
lips lies well behind the lips and renders dark; the closed expressions keep it where it was; every expression
keeps one closed, manifold topology without self-intersections, and its GLB passes the Khronos validator."""

from __future__ import annotations

import numpy as np
import pytest

from idto3d.core.units import METRES_PER_UNIT
from idto3d.evaluate.mouth_view import cavity_depth_mm, front_mouth_luma, mouth_outline

NAMES = ["neutral", "smile", "mouth_open", "mouth_stretch"]


@pytest.fixture(scope="module")
def heads():
    """The mean face's stitched heads (``stages.offline_head``), with their atlases, landmark and strip vertices."""
    from idto3d.face_model.morphable_model import load_morphable_model
    from idto3d.geometry.face_merge import placement
    from idto3d.geometry.template import build_head_template
    from idto3d.stages.offline_head import stitched_heads

    model = load_morphable_model()
    meshes, atlases, landmarks, mouth = stitched_heads(model, None, placement(model.mean, model.landmarks),
                                                       build_head_template(64), NAMES)
    return meshes, dict(zip(NAMES, atlases)), landmarks, mouth


def _metres(atlas) -> np.ndarray:
    return np.asarray(atlas.vertices, dtype=np.float64) * METRES_PER_UNIT


def test_an_open_mouth_pushes_the_strip_behind_the_lips_and_a_closed_one_does_not(heads):
    _, atlases, landmarks, mouth = heads
    depth = {n: cavity_depth_mm(_metres(atlases[n]), landmarks, mouth) for n in NAMES}
    for n, d in depth.items():
        print(f"{n}: strip behind the inner lips, deepest {d.max():.1f} mm, median {np.median(d):.1f}")
    assert mouth.size >= 50  # the strip has rows between the lips, not only their edges
    assert np.median(depth["mouth_open"]) >= 12.0 and depth["mouth_open"].max() >= 20.0
    assert np.median(depth["mouth_stretch"]) > np.median(depth["mouth_open"]) + 5.0
    for closed in ("neutral", "smile"):  # the lips' contact stays as the face model has it (its lips curl in)
        assert depth[closed].max() < 5.0 and abs(np.median(depth[closed])) < 2.0


def test_the_cavity_keeps_one_closed_manifold_topology_without_self_intersections(heads):
    from mesh_checks import intersecting_faces

    from idto3d.geometry.mesh_clean import mesh_defects

    meshes, atlases, _, mouth = heads
    first = meshes["neutral"].faces
    for name in NAMES:
        assert np.array_equal(meshes[name].faces.numpy(), first.numpy())
        defects = mesh_defects(meshes[name])
        assert defects.components == 1 and defects.nonmanifold_edges == 0, (name, defects)
        assert defects.boundary_edges == 0 and defects.degenerate_faces == 0, (name, defects)
    atlas = atlases["mouth_stretch"]  # the deepest pocket
    strip = np.zeros(atlas.uvs.shape[0], bool)
    strip[mouth] = True
    region = np.nonzero(strip[atlas.faces].any(1))[0]
    crossing = intersecting_faces(atlas.vertices, atlas.faces, region)
    print(f"{region.size} pocket triangles, {len(crossing)} crossing another")
    assert not crossing


@pytest.fixture(scope="module")
def exported(heads, tmp_path_factory):
    """neutral and mouth_open exported as GLBs with a plain skin albedo, the strip painted (``texture.mouth``)."""
    from idto3d.export import export_expression
    from idto3d.export.maps import PBRMaps
    from idto3d.texture.mouth import mouth_weight, paint_mouth

    _, atlases, landmarks, mouth = heads
    size = 512
    weight = mouth_weight(atlases["neutral"], mouth, size)
    albedo, roughness = paint_mouth(np.full((size, size, 3), (0.85, 0.68, 0.58), np.float32),
                                    np.full((size, size), 0.6, np.float32), weight)
    maps = PBRMaps.create(albedo, roughness, np.zeros((size, size), np.float32))
    out = tmp_path_factory.mktemp("mouth")
    return {n: export_expression(out, n, atlases[n], maps)["glb"] for n in ("neutral", "mouth_open")}, weight


def test_the_open_mouth_renders_dark_and_the_glbs_pass_the_validator(heads, exported):
    import trimesh
    from gltf_checks import check_exported_glb

    from idto3d.evaluate.assets import load_exported_head

    _, _, landmarks, _ = heads
    paths, weight = exported
    raw = {n: np.asarray(next(iter(trimesh.load(p, process=False).geometry.values())).vertices)
           for n, p in paths.items()}
    luma = {n: front_mouth_luma(load_exported_head(p), mouth_outline(raw["mouth_open"], raw[n], landmarks))[0]
            for n, p in paths.items()}
    print(f"mouth region, front render, mean luma: {luma}; darkened texels {(weight > 0.5).mean():.2%}")
    assert luma["mouth_open"] < 0.5 * luma["neutral"]
    assert (weight > 0.5).mean() < 0.005  # a sliver of the texture: the lips' contact line
    for p in paths.values():
        check_exported_glb(p)


def test_closed_lips_keep_the_face_models_shape_and_every_face_vertex_keeps_its_index():
    from idto3d.face_model.morphable_model import load_morphable_model
    from idto3d.face_model.offline_expressions import expression_vertices
    from idto3d.geometry.mouth_cavity import carve_mouth, mouth_strip

    model = load_morphable_model()
    lm = model.landmarks.numpy()
    strip = mouth_strip(model.mean.double().numpy(), model.faces.numpy(), lm)
    n = model.mean.shape[0]
    assert strip.split.shape[0] > 0 and strip.faces.max() == n + strip.split.shape[0] - 1  # vertices appended only
    moved = {}
    for name in ("neutral", "smile", "mouth_open"):
        v = strip.extend(expression_vertices(model, None, name).double().numpy())
        moved[name] = float(np.abs(carve_mouth(v, strip, lm) - v).max() * METRES_PER_UNIT * 1000)
    print(f"largest move of the carving, mm: {moved}")
    assert moved["neutral"] == 0.0 and moved["smile"] < 1.0 and moved["mouth_open"] > 15.0
