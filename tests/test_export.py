"""Export: xatlas UV atlas, .glb with a PBR material (trimesh, pygltflib, Khronos validator), OBJ/MTL/PNG."""

from __future__ import annotations


import numpy as np
import pygltflib
import pytest
import torch
import trimesh
from PIL import Image

from idto3d.core.errors import IdtoError
from idto3d.export import PBRMaps, UnwrapError, export_expression, shared_atlas, unwrap, write_glb
from idto3d.export.maps import MapError
from idto3d.core.units import METRES_PER_UNIT
from idto3d.geometry.template import build_head_template
from idto3d.render.mesh import Mesh

from gltf_checks import png_texture, validate_glb


@pytest.fixture(scope="module")
def head() -> Mesh:
    return build_head_template(24)


@pytest.fixture(scope="module")
def head_uv(head):
    return unwrap(head)


def icosphere() -> Mesh:
    s = trimesh.creation.icosphere(subdivisions=2)
    return Mesh(torch.tensor(s.vertices, dtype=torch.float32), torch.tensor(s.faces, dtype=torch.int64))


def random_maps(h: int = 48, w: int = 64, normal: bool = True, seed: int = 0) -> PBRMaps:
    rng = np.random.default_rng(seed)
    n = None
    if normal:
        n = rng.normal(size=(h, w, 3)) * 0.3 + np.array([0.0, 0.0, 1.0])
        n /= np.linalg.norm(n, axis=-1, keepdims=True)
    return PBRMaps.create(rng.random((h, w, 3)), rng.random((h, w)), rng.random((h, w)), n)


def check_unwrap(mesh: Mesh, uv) -> None:
    v = mesh.vertices.numpy()
    assert uv.uvs.shape == (uv.vertices.shape[0], 2) and uv.vmapping.shape == (uv.vertices.shape[0],)
    assert uv.uvs.min() >= 0.0 and uv.uvs.max() <= 1.0
    assert uv.vertices.shape[0] >= v.shape[0]  # seams split vertices, never merge them
    np.testing.assert_array_equal(uv.vertices, v[uv.vmapping])
    # Same triangles in the same order, only re-indexed onto the split vertices.
    np.testing.assert_array_equal(uv.vmapping[uv.faces], mesh.faces.numpy())
    assert np.unique(uv.vmapping).size == v.shape[0]
    # Charts do not overlap: total UV area is positive and below the unit square.
    t = uv.uvs[uv.faces].astype(np.float64)
    d1, d2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    area = 0.5 * np.abs(d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0])
    assert 0.3 < area.sum() < 1.0


def test_unwrap_head_template(head, head_uv):
    check_unwrap(head, head_uv)
    again = unwrap(head)  # deterministic layout
    np.testing.assert_array_equal(again.uvs, head_uv.uvs)
    np.testing.assert_array_equal(again.faces, head_uv.faces)


def test_unwrap_icosphere():
    m = icosphere()
    check_unwrap(m, unwrap(m))


def test_shared_atlas_reuses_layout_for_same_topology(head, head_uv):
    other = Mesh(head.vertices * torch.tensor([1.1, 0.9, 1.0]) + 0.05, head.faces.clone())
    a, b = shared_atlas([head, other])
    np.testing.assert_array_equal(a.uvs, head_uv.uvs)
    np.testing.assert_array_equal(b.uvs, a.uvs)
    np.testing.assert_array_equal(b.faces, a.faces)
    np.testing.assert_allclose(b.vertices, other.vertices.numpy()[a.vmapping])


def test_shared_atlas_unwraps_each_for_different_topology(head, head_uv):
    sphere = icosphere()
    a, b = shared_atlas([head, sphere])
    np.testing.assert_array_equal(a.uvs, head_uv.uvs)
    check_unwrap(sphere, b)
    assert b.faces.shape[0] == sphere.faces.shape[0] != a.faces.shape[0]


def test_glb_loads_in_trimesh_in_metres(tmp_path, head, head_uv):
    path = write_glb(tmp_path / "neutral.glb", head_uv, *_map_args(random_maps()))
    scene = trimesh.load(path, process=False)
    (tm,) = scene.geometry.values()
    assert len(tm.vertices) == head_uv.vertices.shape[0] and len(tm.faces) == head_uv.faces.shape[0]
    src = head.vertices.numpy()
    extent = src.max(0) - src.min(0)
    np.testing.assert_allclose(tm.extents, extent * METRES_PER_UNIT, rtol=1e-5)
    np.testing.assert_allclose(tm.bounds.mean(0), 0.0, atol=1e-6)  # bounding box centred
    np.testing.assert_allclose(tm.vertices, (head_uv.vertices - 0.5 * (src.min(0) + src.max(0))) * METRES_PER_UNIT,
                               atol=1e-6)
    # trimesh flips glTF's top-left v back to the OpenGL convention: it must give our UVs back.
    np.testing.assert_allclose(tm.visual.uv, head_uv.uvs, atol=1e-6)
    mat = tm.visual.material
    assert mat.baseColorTexture is not None and mat.baseColorTexture.size == (64, 48)
    assert mat.metallicRoughnessTexture is not None and mat.normalTexture is not None
    # Outward normals: they point away from the centre on average for the closed head.
    assert (np.einsum("ij,ij->i", tm.vertex_normals, tm.vertices) > 0).mean() > 0.9


def _map_args(maps: PBRMaps):
    return maps.albedo, maps.roughness, maps.metallic, maps.normal


def test_glb_material_in_pygltflib(tmp_path, head_uv):
    maps = random_maps()
    path = write_glb(tmp_path / "smile.glb", head_uv, *_map_args(maps))
    gltf = pygltflib.GLTF2().load(str(path))
    pbr = gltf.materials[0].pbrMetallicRoughness
    assert pbr.baseColorTexture is not None and pbr.metallicRoughnessTexture is not None
    assert gltf.materials[0].normalTexture is not None
    assert set(vars(gltf.meshes[0].primitives[0].attributes)) >= {"POSITION", "NORMAL", "TANGENT", "TEXCOORD_0"}
    base = png_texture(gltf, pbr.baseColorTexture.index)
    np.testing.assert_array_equal(base, np.round(maps.albedo * 255).astype(np.uint8))
    mr = png_texture(gltf, pbr.metallicRoughnessTexture.index)
    assert mr.shape == (48, 64, 3)
    np.testing.assert_array_equal(mr[..., 1], np.round(maps.roughness * 255).astype(np.uint8))  # G = roughness
    np.testing.assert_array_equal(mr[..., 2], np.round(maps.metallic * 255).astype(np.uint8))  # B = metallic


def test_glb_without_normal_map(tmp_path, head_uv):
    maps = random_maps(normal=False)
    path = write_glb(tmp_path / "plain.glb", head_uv, *_map_args(maps))
    gltf = pygltflib.GLTF2().load(str(path))
    assert gltf.materials[0].normalTexture is None and len(gltf.images) == 2
    assert gltf.meshes[0].primitives[0].attributes.TANGENT is None


@pytest.mark.parametrize("normal", [True, False])
def test_glb_passes_khronos_validator(tmp_path, head_uv, normal):
    path = write_glb(tmp_path / "v.glb", head_uv, *_map_args(random_maps(normal=normal)))
    report = validate_glb(path)
    issues = report["issues"]
    assert issues["numErrors"] == 0, issues["messages"]
    assert issues["numWarnings"] == 0, issues["messages"]
    assert len(report["info"]["resources"]) == (4 if normal else 3)  # buffer + images


def test_export_expression_writes_glb_and_obj(tmp_path, head_uv):
    maps = random_maps()
    paths = export_expression(tmp_path / "export", "neutral", head_uv, maps)
    assert set(paths) == {"glb", "obj", "mtl", "albedo", "roughness", "metallic", "normal"}
    assert all(p.is_file() for p in paths.values())
    assert not [p for p in (tmp_path / "export").iterdir() if ".tmp" in p.name]
    mtl = paths["mtl"].read_text()
    for key in ("map_Kd neutral_albedo.png", "map_Pr neutral_roughness.png", "map_Pm neutral_metallic.png",
                "norm neutral_normal.png"):
        assert key in mtl
    tm = trimesh.load(paths["obj"], process=False, maintain_order=True)
    assert len(tm.faces) == head_uv.faces.shape[0]
    np.testing.assert_allclose(tm.bounds.mean(0), 0.0, atol=1e-5)
    glb = next(iter(trimesh.load(paths["glb"], process=False).geometry.values()))
    np.testing.assert_allclose(tm.extents, glb.extents, atol=2e-6)
    # OBJ is bottom-left origin like ours: trimesh gives the same UVs per face corner.
    np.testing.assert_allclose(tm.visual.uv[tm.faces], head_uv.uvs[head_uv.faces], atol=2e-6)
    assert np.asarray(tm.visual.material.image).shape[:2] == (48, 64)
    rough = np.asarray(Image.open(paths["roughness"]))
    np.testing.assert_array_equal(rough, np.round(maps.roughness * 255).astype(np.uint8))


def test_unwrap_rejects_empty_and_degenerate_meshes():
    with pytest.raises(UnwrapError, match="no vertices"):
        unwrap(Mesh(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int64)))
    with pytest.raises(UnwrapError, match="no triangles"):
        unwrap(Mesh(torch.rand(4, 3), torch.zeros(0, 3, dtype=torch.int64)))
    collinear = torch.tensor([[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0]])
    with pytest.raises(UnwrapError, match="zero area"):
        unwrap(Mesh(collinear, torch.tensor([[0, 1, 2], [1, 2, 3]])))
    with pytest.raises(UnwrapError, match="face indices"):
        unwrap(Mesh(torch.rand(3, 3), torch.tensor([[0, 1, 5]])))
    nan = torch.rand(3, 3)
    nan[0, 0] = float("nan")
    with pytest.raises(UnwrapError, match="NaN"):
        unwrap(Mesh(nan, torch.tensor([[0, 1, 2]])))
    with pytest.raises(UnwrapError, match="at least one"):
        shared_atlas([])
    assert issubclass(UnwrapError, IdtoError)


def test_bad_maps_and_names_raise_and_leave_no_file(tmp_path, head_uv):
    rng = np.random.default_rng(0)
    with pytest.raises(MapError, match="albedo"):
        write_glb(tmp_path / "a.glb", head_uv, rng.random((8, 8)), rng.random((8, 8)), rng.random((8, 8)))
    with pytest.raises(MapError, match="same size"):
        write_glb(tmp_path / "a.glb", head_uv, rng.random((8, 8, 3)), rng.random((8, 8)), rng.random((4, 4)))
    with pytest.raises(MapError, match=r"\[0.0, 1.0\]"):
        write_glb(tmp_path / "a.glb", head_uv, rng.random((8, 8, 3)) * 2, rng.random((8, 8)), rng.random((8, 8)))
    with pytest.raises(IdtoError, match="safe file name"):
        export_expression(tmp_path, "../evil", head_uv, random_maps())
    assert list(tmp_path.iterdir()) == []
