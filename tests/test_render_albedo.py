"""Claims about albedo renders: flat colours, vertex-colour interpolation, UV texture orientation, gradients."""

import math

import pytest
import torch
import trimesh

from idto3d.core.errors import IdtoError
from idto3d.render import Mesh, orbit_camera, render_albedo, render_normal_map
from idto3d.render.albedo import sample_texture


def _sphere(subdivisions: int = 3) -> Mesh:
    ico = trimesh.creation.icosphere(subdivisions=subdivisions)
    return Mesh(torch.tensor(ico.vertices, dtype=torch.float32), torch.tensor(ico.faces, dtype=torch.int64))


def _quad() -> Mesh:
    """The square [-1, 1]^2 in the plane z = 0, facing +Z (the front camera)."""
    v = torch.tensor([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], dtype=torch.float64)
    return Mesh(v, torch.tensor([[0, 1, 2], [0, 2, 3]]))


def _plane_hits(camera, H: int, W: int) -> torch.Tensor:
    """World (x, y) where each pixel centre's ray meets z = 0, for a camera on +Z at azimuth 0."""
    t = math.tan(math.radians(float(camera.fov_deg[0])) / 2)
    cols = (torch.arange(W, dtype=torch.float64) + 0.5) / W * 2 - 1
    rows = 1 - (torch.arange(H, dtype=torch.float64) + 0.5) / H * 2
    y, x = torch.meshgrid(rows, cols, indexing="ij")
    dist = float(camera.radius[0])
    return torch.stack([x * t * dist, y * t * dist], -1)


def test_flat_coloured_sphere_renders_its_colour_on_white():
    colour = torch.tensor([0.2, 0.6, 0.9])
    mesh = _sphere()
    cams = orbit_camera([0.0, 30.0], [0.0, 120.0], 3.0, 40.0)
    out = render_albedo(mesh, cams, 64, colour.expand(mesh.vertices.shape[0], 3))
    covered = out.fragments.mask
    inner = -torch.nn.functional.max_pool2d(-covered.float()[:, None], 3, 1, 1)[:, 0] > 0.5
    assert inner.sum() > 1000
    assert torch.allclose(out.image[inner], colour.expand(int(inner.sum()), 3), atol=1e-5)
    # Background away from the antialiased outline is exactly white.
    near = torch.nn.functional.max_pool2d(covered.float()[:, None], 3, 1, 1)[:, 0] > 0.5
    assert (out.image[~near] == 1.0).all() and (~near).sum() > 1000
    assert out.mask.shape == (2, 64, 64, 1)
    # The same silhouette as the normal map of the same mesh and cameras.
    assert torch.equal(covered, render_normal_map(mesh, cams, 64).fragments.mask)


def test_vertex_colours_interpolate_perspective_correctly():
    mesh = _quad()
    colours = (mesh.vertices + 1) / 2  # colour = a linear function of position
    cam = orbit_camera(0.0, 0.0, 2.5, 30.0, dtype=torch.float64)
    out = render_albedo(mesh, cam, 48, colours)
    hit = _plane_hits(cam, 48, 48)
    expected = torch.cat([(hit + 1) / 2, torch.full_like(hit[..., :1], 0.5)], -1)
    covered = out.fragments.mask[0]
    assert covered.all()  # the quad fills the view
    assert (out.albedo[0] - expected).abs().max() < 1e-9


def _checker_texture(size: int = 64) -> torch.Tensor:
    """Quadrants as they appear in the image file: top-left red, top-right green, bottom-left blue,
    bottom-right yellow."""
    tex = torch.zeros(size, size, 3)
    h = size // 2
    tex[:h, :h] = torch.tensor([1.0, 0, 0])
    tex[:h, h:] = torch.tensor([0, 1.0, 0])
    tex[h:, :h] = torch.tensor([0, 0, 1.0])
    tex[h:, h:] = torch.tensor([1.0, 1.0, 0])
    return tex


def test_uv_checker_texture_maps_upright_and_unmirrored():
    mesh = Mesh(_quad().vertices.float(), _quad().faces)
    uv = (mesh.vertices[:, :2] + 1) / 2  # u to the right, v up (OpenGL convention)
    cam = orbit_camera(0.0, 0.0, 2.5, 30.0)
    out = render_albedo(mesh, cam, 64, uv=uv, texture=_checker_texture())
    hit = _plane_hits(cam, 64, 64)
    uv_px = (hit + 1) / 2
    # Away from the quadrant borders (one texel = 1/64) bilinear sampling returns the exact colour.
    far = ((uv_px - 0.5).abs() > 2 / 64).all(-1)
    img = out.image[0]
    left, top = uv_px[..., 0] < 0.5, uv_px[..., 1] > 0.5
    for sel, colour in ((left & top, [1, 0, 0]), (~left & top, [0, 1, 0]),
                        (left & ~top, [0, 0, 1]), (~left & ~top, [1, 1, 0])):
        region = sel & far
        assert region.sum() > 300
        assert torch.allclose(img[region], torch.tensor(colour, dtype=img.dtype).expand(int(region.sum()), 3),
                              atol=1e-5)
    # And the image's top-left pixel is red: rows are top-first, u is not mirrored.
    assert torch.allclose(img[0, 0], torch.tensor([1.0, 0, 0]))


def test_texture_lookup_is_bilinear_between_texel_centres():
    tex = torch.tensor([[[0.0], [1.0]]])  # 1 row, 2 texels: centres at u = 0.25 and 0.75
    uv = torch.tensor([[0.25, 0.5], [0.5, 0.5], [0.75, 0.5], [0.0, 0.5], [1.0, 0.5]]).view(1, 1, 5, 2)
    out = sample_texture(tex, uv)[0, 0, :, 0]
    assert torch.allclose(out, torch.tensor([0.0, 0.5, 1.0, 0.0, 1.0]))


def test_render_is_differentiable_wrt_texture_and_can_fit_a_target():
    mesh = Mesh(_quad().vertices.float(), _quad().faces)
    uv = (mesh.vertices[:, :2] + 1) / 2
    cam = orbit_camera(0.0, 0.0, 2.5, 30.0)
    target = render_albedo(mesh, cam, 32, uv=uv, texture=_checker_texture(16)).image.detach()
    tex = torch.full((16, 16, 3), 0.5, requires_grad=True)
    opt = torch.optim.Adam([tex], lr=0.05)
    losses = []
    for _ in range(60):
        loss = (render_albedo(mesh, cam, 32, uv=uv, texture=tex).image - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
    assert tex.grad is not None and tex.grad.abs().sum() > 0
    assert losses[-1] < 0.05 * losses[0]


def test_split_attribute_vertices_render_like_shared_ones():
    # UVs split at a seam: positions shared (4 vertices), attributes per corner (6 rows).
    mesh = Mesh(_quad().vertices.float(), _quad().faces)
    colours = torch.rand(4, 3, generator=torch.Generator().manual_seed(0))
    split_faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    split_colours = colours[mesh.faces.reshape(-1)]
    cam = orbit_camera(10.0, 20.0, 3.0, 40.0)
    a = render_albedo(mesh, cam, 32, colours).image
    b = render_albedo(mesh, cam, 32, split_colours, attribute_faces=split_faces).image
    assert torch.allclose(a, b, atol=1e-6)


def test_background_colour_and_bad_inputs():
    mesh = _sphere(1)
    cam = orbit_camera(0.0, 0.0, 3.0, 40.0)
    white = torch.ones(mesh.vertices.shape[0], 3)
    out = render_albedo(mesh, cam, 32, white * 0.3, background=torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(out.image[0, 0, 0], torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(IdtoError, match="either vertex_colors"):
        render_albedo(mesh, cam, 32)
    with pytest.raises(IdtoError, match="either vertex_colors"):
        render_albedo(mesh, cam, 32, white, uv=torch.zeros(mesh.vertices.shape[0], 2), texture=torch.ones(4, 4, 3))
    with pytest.raises(IdtoError, match="needs both uv"):
        render_albedo(mesh, cam, 32, uv=torch.zeros(mesh.vertices.shape[0], 2))
    with pytest.raises(IdtoError, match="vertex_colors must be"):
        render_albedo(mesh, cam, 32, white[:5])
    with pytest.raises(IdtoError, match="texture must be"):
        render_albedo(mesh, cam, 32, uv=torch.zeros(mesh.vertices.shape[0], 2), texture=torch.ones(4, 4))
