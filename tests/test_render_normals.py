"""Claims about camera-space normal maps: accuracy, conventions, background and gradients."""

import math

import pytest
import torch
import trimesh

from idto3d.core.errors import IdtoError
from idto3d.render import Camera, Mesh, orbit_camera, render_normal_map


def _unit_sphere(subdivisions: int, dtype=torch.float64) -> Mesh:
    ico = trimesh.creation.icosphere(subdivisions=subdivisions)
    return Mesh(torch.tensor(ico.vertices, dtype=dtype), torch.tensor(ico.faces, dtype=torch.int64))


def _analytic_sphere_normals(camera: Camera, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Camera-space normals of the unit sphere at the origin, by ray casting each pixel centre."""
    t = math.tan(math.radians(float(camera.fov_deg[0])) / 2)
    cols = (torch.arange(W, dtype=torch.float64) + 0.5) / W * 2 - 1
    rows = 1 - (torch.arange(H, dtype=torch.float64) + 0.5) / H * 2
    y, x = torch.meshgrid(rows, cols, indexing="ij")
    d = torch.nn.functional.normalize(torch.stack([x * t * W / H, y * t, -torch.ones_like(x)], -1), dim=-1)
    centre = camera.view[0].double()[:3, 3]  # the origin in camera space
    b = (d * centre).sum(-1)
    disc = b * b - (centre * centre).sum() + 1.0
    s = b - torch.sqrt(disc.clamp(min=0))
    return d * s[..., None] - centre, disc > 0


def _erode(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    k = 2 * pixels + 1
    return -torch.nn.functional.max_pool2d(-mask.double()[None, None], k, 1, pixels)[0, 0] > 0.5


@pytest.mark.parametrize("elevation,azimuth", [(0.0, 0.0), (30.0, 60.0), (-20.0, 200.0)])
def test_sphere_normals_match_the_analytic_ones(elevation, azimuth):
    camera = orbit_camera(elevation, azimuth, 3.0, 40.0, dtype=torch.float64)
    render = render_normal_map(_unit_sphere(5), camera, 96)
    expected, hit = _analytic_sphere_normals(camera, 96, 96)
    covered = render.fragments.mask[0]
    # Compare away from the outline: antialiasing blends the outermost pixels with the
    # background, and there the polyhedron's outline differs from the sphere's circle.
    interior = _erode(covered & hit, 2)
    assert interior.sum() > 3000
    error = (render.normals[0] - expected).abs()[interior].mean()
    assert error < 1e-3
    # The encoded image carries the same normals.
    decoded = render.image[0][interior] * 2 - 1
    assert (decoded - expected[interior]).abs().mean() < 1e-3


def test_background_is_exactly_white_and_has_no_triangle():
    render = render_normal_map(_unit_sphere(3, torch.float32), orbit_camera(10.0, 30.0, 3.0, 45.0), 64)
    background = render.mask[0, ..., 0] == 0
    assert background.sum() > 1000
    assert (render.image[0][background] == 1.0).all()
    assert (render.fragments.triangle_id[0][background] == -1).all()
    assert (render.normals[0][background] == 0).all()


def test_background_value_is_configurable():
    render = render_normal_map(_unit_sphere(2, torch.float32), orbit_camera(0.0, 0.0, 3.0, 45.0), 32, background=0.0)
    assert (render.image[0][render.mask[0, ..., 0] == 0] == 0.0).all()


def test_front_view_of_a_plus_z_facing_surface_is_bluish():
    quad = Mesh(
        torch.tensor([[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.5, 0.5, 0.0], [-0.5, 0.5, 0.0]]),
        torch.tensor([[0, 1, 2], [0, 2, 3]]),
    )
    for shading in ("smooth", "flat"):
        render = render_normal_map(quad, orbit_camera(0.0, 0.0, 2.5, 45.0), 32, shading=shading)
        assert torch.allclose(render.image[0, 16, 16], torch.tensor([0.5, 0.5, 1.0]), atol=1e-5)
        assert torch.allclose(render.normals[0, 16, 16], torch.tensor([0.0, 0.0, 1.0]), atol=1e-5)


def test_the_side_camera_sees_plus_x_facing_surfaces_face_on():
    # The sphere's +x pole faces the azimuth-90 camera: the image centre is bluish.
    render = render_normal_map(_unit_sphere(3, torch.float32), orbit_camera(0.0, 90.0, 3.0, 45.0), 33)
    assert torch.allclose(render.normals[0, 16, 16], torch.tensor([0.0, 0.0, 1.0]), atol=0.02)
    # In the front view the sphere's right half (+x) is reddish and its top (+y) greenish.
    front = render_normal_map(_unit_sphere(3, torch.float32), orbit_camera(0.0, 0.0, 3.0, 45.0), 33)
    assert front.image[0, 16, 26, 0] > 0.75 and front.image[0, 6, 16, 1] > 0.75


def test_flat_shading_uses_face_normals():
    mesh = _unit_sphere(2)
    camera = orbit_camera(15.0, 25.0, 3.0, 40.0, dtype=torch.float64)
    render = render_normal_map(mesh, camera, 48, shading="flat")
    tid = render.fragments.triangle_id[0]
    covered = tid >= 0
    face_normals_cam = mesh.face_normals() @ camera.view[0, :3, :3].T
    assert torch.allclose(render.normals[0][covered], face_normals_cam[tid[covered]], atol=1e-10)


def test_normal_maps_render_a_batch_of_cameras():
    camera = orbit_camera([0.0, 30.0, -10.0], [0.0, 90.0, 180.0], 3.0, 45.0)
    render = render_normal_map(_unit_sphere(2, torch.float32), camera, (24, 32))
    assert render.image.shape == (3, 24, 32, 3)
    assert render.mask.shape == (3, 24, 32, 1)
    assert render.normals.shape == (3, 24, 32, 3)
    assert render.image.min() >= 0 and render.image.max() <= 1


@pytest.mark.parametrize("shading", ["smooth", "flat"])
def test_image_gradients_reach_the_vertices_and_are_finite(shading):
    mesh = _unit_sphere(2, torch.float32)
    verts = mesh.vertices.clone().requires_grad_(True)
    render = render_normal_map(Mesh(verts, mesh.faces), orbit_camera(20.0, 40.0, 3.0, 45.0), 32, shading=shading)
    weights = torch.rand(render.image.shape, generator=torch.Generator().manual_seed(0))
    (render.image * weights).sum().backward()
    assert torch.isfinite(verts.grad).all()
    assert verts.grad.abs().sum() > 0


def test_unknown_shading_raises_idto_error():
    with pytest.raises(IdtoError):
        render_normal_map(_unit_sphere(1, torch.float32), orbit_camera(0.0, 0.0, 3.0, 45.0), 16, shading="phong")


def test_an_empty_mesh_renders_as_background():
    # Marching tetrahedra can yield no surface early in optimisation; that is not an error.
    empty = Mesh(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int64))
    render = render_normal_map(empty, orbit_camera(0.0, 0.0, 3.0, 45.0), 16)
    assert (render.image == 1.0).all() and (render.mask == 0).all()
