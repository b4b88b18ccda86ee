"""Texel maps (texture/texels.py): which surface point each texel of a UV atlas shows."""

import numpy as np
import pytest
import torch
import trimesh

from idto3d.core.errors import IdtoError
from idto3d.texture.uv_atlas import UVMesh, unwrap
from idto3d.render.albedo import sample_texture
from idto3d.render.mesh import Mesh
from idto3d.texture.texels import scatter_texels, texel_map


@pytest.fixture(scope="module")
def uv_mesh() -> UVMesh:
    # An ellipsoid, so no axis or symmetry of the sphere hides a flipped convention.
    m = trimesh.creation.icosphere(subdivisions=2)
    v = torch.tensor(m.vertices * [0.9, 0.7, 0.5], dtype=torch.float32)
    return unwrap(Mesh(v, torch.tensor(m.faces, dtype=torch.int64)))


def _texel_centres(size: int) -> np.ndarray:
    """(u, v) of every texel centre, row-major with row 0 at the top (v = 1)."""
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    return np.stack([(cols + 0.5) / size, 1.0 - (rows + 0.5) / size], -1).reshape(-1, 2)


def _barycentric(p: np.ndarray, tri: np.ndarray) -> np.ndarray:
    """Barycentrics of 2-D points ``p`` [N, 2] in every triangle ``tri`` [F, 3, 2] -> [N, F, 3]."""
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    d = (b[:, 1] - c[:, 1]) * (a[:, 0] - c[:, 0]) + (c[:, 0] - b[:, 0]) * (a[:, 1] - c[:, 1])
    px, py = p[:, None, 0] - c[None, :, 0], p[:, None, 1] - c[None, :, 1]
    l0 = ((b[:, 1] - c[:, 1]) * px + (c[:, 0] - b[:, 0]) * py) / d
    l1 = ((c[:, 1] - a[:, 1]) * px + (a[:, 0] - c[:, 0]) * py) / d
    return np.stack([l0, l1, 1 - l0 - l1], -1)


def _uv_jacobian_bound(uv_mesh: UVMesh) -> float:
    """Largest 3-D distance per unit of UV distance over the mesh's triangles."""
    v, f, uv = uv_mesh.vertices.astype(np.float64), uv_mesh.faces, uv_mesh.uvs.astype(np.float64)
    ratios = []
    for i, j in ((0, 1), (1, 2), (2, 0)):
        d3 = np.linalg.norm(v[f[:, i]] - v[f[:, j]], axis=1)
        ratios.append(d3 / np.linalg.norm(uv[f[:, i]] - uv[f[:, j]], axis=1))
    # Edge ratios bound the map's stretch only up to the triangle's shape; a factor 2 covers xatlas' charts.
    return 2.0 * float(np.max(ratios))


def test_texel_points_are_the_barycentric_points_of_their_uv_triangle(uv_mesh):
    size = 64
    tm = texel_map(uv_mesh, size)
    assert tm.size == size and tm.points.dtype == torch.float32 and tm.texel_index.dtype == torch.int64
    assert tm.points.shape == (tm.texel_index.numel(), 3) and tm.fill_index.shape == (size * size,)
    assert tm.coverage == pytest.approx(tm.texel_index.numel() / size**2)
    tri_uv = uv_mesh.uvs[uv_mesh.faces].astype(np.float64)
    centres = _texel_centres(size)
    bary = _barycentric(centres, tri_uv)  # [T*T, F, 3]
    inside = (bary >= -1e-6).all(-1)
    # Covered exactly where a texel centre lies in some UV triangle (charts do not overlap).
    covered = np.zeros(size * size, bool)
    covered[tm.texel_index.numpy()] = True
    strictly = (bary > 1e-4).all(-1).any(-1)
    assert covered[strictly].all()
    assert not covered[~inside.any(-1)].any()
    # Each covered texel shows the barycentric combination of its triangle's 3-D corners.
    idx = tm.texel_index.numpy()
    face = inside[idx].argmax(-1)
    b = bary[idx, face]
    expected = np.einsum("nk,nkc->nc", b, uv_mesh.vertices[uv_mesh.faces[face]].astype(np.float64))
    np.testing.assert_allclose(tm.points.numpy(), expected, atol=1e-5)


def test_every_triangle_with_room_for_a_texel_gets_one(uv_mesh):
    size = 128
    tm = texel_map(uv_mesh, size)
    uv = uv_mesh.uvs.astype(np.float64)
    a, b, c = (uv[uv_mesh.faces[:, i]] for i in range(3))
    area = 0.5 * np.abs((b - a)[:, 0] * (c - a)[:, 1] - (b - a)[:, 1] * (c - a)[:, 0])
    perimeter = sum(np.linalg.norm(x - y, axis=1) for x, y in ((a, b), (b, c), (c, a)))
    inradius = 2 * area / perimeter
    # A disc of radius >= 1/(T sqrt 2) holds a whole texel cell, hence a texel centre.
    roomy = inradius > 1.0 / (size * np.sqrt(2))
    assert roomy.mean() > 0.9  # the criterion is not vacuous for this atlas
    centres = _texel_centres(size)[tm.texel_index.numpy()]
    bary = _barycentric(centres, uv[uv_mesh.faces])
    has_texel = (bary >= -1e-6).all(-1).any(0)
    assert has_texel[roomy].all()


def test_texel_at_a_triangles_uv_centroid_shows_its_3d_centroid(uv_mesh):
    size = 256
    tm = texel_map(uv_mesh, size)
    position = {int(t): i for i, t in enumerate(tm.texel_index)}
    tol = _uv_jacobian_bound(uv_mesh) * np.sqrt(0.5) / size  # half a texel diagonal, in model units
    for face in (0, 17, 101, 250, len(uv_mesh.faces) - 1):
        u, v = uv_mesh.uvs[uv_mesh.faces[face]].mean(0)
        row, col = int((1.0 - v) * size), int(u * size)
        assert row * size + col in position, f"the texel under face {face}'s UV centroid is not covered"
        point = tm.points[position[row * size + col]].numpy()
        centroid = uv_mesh.vertices[uv_mesh.faces[face]].mean(0)
        assert np.linalg.norm(point - centroid) < tol


def test_baked_texture_sampled_at_uvs_returns_the_function_at_the_3d_points(uv_mesh):
    """End to end: scatter a function of the texel points, sample it like the renderer does."""
    size = 256
    tm = texel_map(uv_mesh, size)

    def f(p: torch.Tensor) -> torch.Tensor:  # not symmetric under any axis flip
        return torch.stack([p[:, 0] + 0.3 * p[:, 1], p[:, 1] - 0.5 * p[:, 2], p[:, 2] + 0.2 * p[:, 0]], -1)

    texture = scatter_texels(f(tm.points), tm)
    assert texture.shape == (size, size, 3)
    uv = torch.from_numpy(uv_mesh.uvs)
    faces = torch.from_numpy(uv_mesh.faces)
    verts = torch.from_numpy(uv_mesh.vertices)
    # Face centroids: interior points, bilinear lookups see only this chart's texels.
    cen_uv = uv[faces].mean(1)
    got = sample_texture(texture, cen_uv.view(1, 1, -1, 2)).view(-1, 3)
    want = f(verts[faces].mean(1))
    err_centroid = (got - want).abs().max().item()
    # Vertices sit on chart borders: the dilated (filled) texels keep the error near a texel's worth.
    got_v = sample_texture(texture, uv.view(1, 1, -1, 2)).view(-1, 3)
    err_vertex = (got_v - f(verts)).abs().max().item()
    texel = _uv_jacobian_bound(uv_mesh) / size
    # f is affine on each triangle, so bilinear lookups inside one are exact up to float32 (measured 9e-7).
    assert err_centroid < 0.05 * texel, err_centroid
    assert err_vertex < 1.5 * texel, err_vertex  # measured 0.67 texel
    # The same check with v flipped fails badly, so the test pins the row convention.
    flipped = sample_texture(texture, torch.stack([cen_uv[:, 0], 1 - cen_uv[:, 1]], -1).view(1, 1, -1, 2)).view(-1, 3)
    assert (flipped - want).abs().max().item() > 0.3


def test_fill_index_points_at_the_nearest_covered_texel(uv_mesh):
    size = 32
    tm = texel_map(uv_mesh, size)
    n = tm.texel_index.numel()
    fill = tm.fill_index
    assert fill.min() >= 0 and fill.max() < n
    assert torch.equal(fill[tm.texel_index], torch.arange(n))
    rc = lambda flat: torch.stack([flat // size, flat % size], -1).double()  # noqa: E731
    everything = rc(torch.arange(size * size))
    nearest = torch.cdist(everything, rc(tm.texel_index)).min(1).values
    assigned = (everything - rc(tm.texel_index[fill])).norm(dim=1)
    torch.testing.assert_close(assigned, nearest, atol=1e-9, rtol=0)


def test_scatter_texels_is_a_differentiable_gather(uv_mesh):
    tm = texel_map(uv_mesh, 32)
    values = torch.rand(tm.texel_index.numel(), 2, requires_grad=True)
    tex = scatter_texels(values, tm)
    assert torch.equal(tex.view(-1, 2)[tm.texel_index], values.detach())
    tex.sum().backward()
    # Each value is read once by its own texel plus once per empty texel it fills.
    counts = torch.bincount(tm.fill_index, minlength=values.shape[0]).float()
    assert torch.equal(values.grad, counts[:, None].expand(-1, 2))
    with pytest.raises(ValueError, match="one row per covered texel"):
        scatter_texels(values[:-1], tm)


def test_tiny_or_empty_atlases_raise_a_helpful_error():
    # One triangle far smaller than a texel, between texel centres.
    tiny = UVMesh(
        vertices=np.eye(3, dtype=np.float32),
        faces=np.array([[0, 1, 2]], dtype=np.int64),
        uvs=np.array([[0.01, 0.01], [0.03, 0.01], [0.01, 0.03]], dtype=np.float32),
        vmapping=np.arange(3, dtype=np.int64),
    )
    with pytest.raises(IdtoError, match="larger texture resolution"):
        texel_map(tiny, 8)
    assert texel_map(tiny, 128).texel_index.numel() > 0  # the same atlas is fine at a larger size
    empty = UVMesh(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64), np.zeros((0, 2), np.float32),
                   np.zeros(0, np.int64))
    with pytest.raises(IdtoError, match="no triangles"):
        texel_map(empty, 64)
    with pytest.raises(IdtoError, match="positive integer"):
        texel_map(tiny, 0)
