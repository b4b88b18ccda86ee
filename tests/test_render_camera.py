"""Claims about the orbit cameras and the view words used in prompts."""

import math

import pytest
import torch

from idto3d.core.errors import IdtoError
from idto3d.render import Camera, orbit_camera, sample_orbit_cameras, view_word


def _ndc(camera: Camera, point: list[float]) -> torch.Tensor:
    clip = camera.project(torch.tensor([point], dtype=torch.float32))[0, 0]
    return clip[:3] / clip[3]


def test_azimuth_zero_camera_sits_on_plus_z_and_looks_at_the_origin():
    cam = orbit_camera(0.0, 0.0, 2.5, 45.0)
    assert torch.allclose(cam.eye[0], torch.tensor([0.0, 0.0, 2.5]), atol=1e-6)
    # The origin lies straight ahead: centre of the image, in front of the camera.
    origin_cam = cam.view[0] @ torch.tensor([0.0, 0.0, 0.0, 1.0])
    assert torch.allclose(origin_cam[:3], torch.tensor([0.0, 0.0, -2.5]), atol=1e-6)


def test_azimuth_90_camera_sits_on_plus_x():
    cam = orbit_camera(0.0, 90.0, 3.0, 45.0)
    assert torch.allclose(cam.eye[0], torch.tensor([3.0, 0.0, 0.0]), atol=1e-5)


def test_positive_elevation_puts_the_camera_above_looking_down_at_the_origin():
    cam = orbit_camera(30.0, 0.0, 2.0, 45.0)
    assert cam.eye[0, 1] == pytest.approx(2.0 * math.sin(math.radians(30)), abs=1e-6)
    assert torch.allclose(_ndc(cam, [0.0, 0.0, 0.0])[:2], torch.zeros(2), atol=1e-6)


def test_world_right_and_up_appear_right_and_up_in_the_front_view():
    cam = orbit_camera(0.0, 0.0, 3.0, 45.0)
    assert _ndc(cam, [0.3, 0.0, 0.0])[0] > 0.1
    assert _ndc(cam, [0.0, 0.3, 0.0])[1] > 0.1
    # Nearer points have smaller NDC depth.
    assert _ndc(cam, [0.0, 0.0, 0.5])[2] < _ndc(cam, [0.0, 0.0, -0.5])[2]


@pytest.mark.parametrize("elevation", [-90.0, -45.0, 0.0, 60.0, 90.0])
def test_view_rotation_is_rigid_even_straight_above_or_below(elevation):
    cam = orbit_camera(elevation, 37.0, 2.0, 50.0)
    r = cam.view[0, :3, :3].double()
    assert torch.allclose(r @ r.T, torch.eye(3, dtype=torch.float64), atol=1e-6)
    assert torch.det(r) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(_ndc(cam, [0.0, 0.0, 0.0])[:2], torch.zeros(2), atol=1e-5)


def test_vertical_fov_maps_the_view_cone_edge_to_the_image_edge():
    cam = orbit_camera(0.0, 0.0, 2.0, 60.0)
    y_edge = 2.0 * math.tan(math.radians(30))  # on the plane through the origin
    assert _ndc(cam, [0.0, y_edge, 0.0])[1] == pytest.approx(1.0, abs=1e-5)


def test_parameters_broadcast_into_a_batch_that_can_be_indexed():
    cam = orbit_camera([0.0, 10.0, 20.0], 45.0, 2.0, [40.0, 50.0, 60.0])
    assert len(cam) == 3
    assert cam.view.shape == (3, 4, 4) and cam.proj.shape == (3, 4, 4) and cam.mvp.shape == (3, 4, 4)
    one = cam[1]
    assert len(one) == 1 and one.elevation_deg.item() == pytest.approx(10.0)
    assert len(cam[1:]) == 2
    assert cam.to("cpu").fov_deg.tolist() == pytest.approx([40.0, 50.0, 60.0])


def test_sampled_cameras_are_deterministic_under_a_seed_and_within_ranges():
    kwargs = dict(elevation_range=(-10, 45), azimuth_range=(-180, 180), radius_range=(2.0, 3.0), fov_range=(30, 50))
    a = sample_orbit_cameras(64, **kwargs, generator=torch.Generator().manual_seed(7))
    b = sample_orbit_cameras(64, **kwargs, generator=torch.Generator().manual_seed(7))
    c = sample_orbit_cameras(64, **kwargs, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.view, b.view) and torch.equal(a.azimuth_deg, b.azimuth_deg)
    assert not torch.equal(a.azimuth_deg, c.azimuth_deg)
    assert len(a) == 64
    for values, (lo, hi) in [(a.elevation_deg, (-10, 45)), (a.azimuth_deg, (-180, 180)),
                             (a.radius, (2.0, 3.0)), (a.fov_deg, (30, 50))]:
        assert values.min() >= lo and values.max() <= hi
    assert torch.allclose(a.eye.norm(dim=-1), a.radius, atol=1e-5)


@pytest.mark.parametrize(
    "override",
    [
        {"elevation_range": (10, 0)},
        {"azimuth_range": (0,)},
        {"radius_range": (0.0, 1.0)},
        {"radius_range": (-2.0, -1.0)},
        {"fov_range": (0.0, 40.0)},
        {"fov_range": (40.0, 180.0)},
        {"elevation_range": (0, float("nan"))},
        {"n": 0},
    ],
)
def test_invalid_sampling_ranges_raise_idto_error(override):
    kwargs = dict(n=4, elevation_range=(0, 10), azimuth_range=(-30, 30), radius_range=(2, 3), fov_range=(40, 50))
    kwargs.update(override)
    with pytest.raises(IdtoError):
        sample_orbit_cameras(**kwargs)


@pytest.mark.parametrize("kwargs", [{"radius": 0.0}, {"fov_deg": 180.0}, {"fov_deg": -5.0}])
def test_invalid_orbit_parameters_raise_idto_error(kwargs):
    args = dict(elevation_deg=0.0, azimuth_deg=0.0, radius=2.0, fov_deg=45.0)
    args.update(kwargs)
    with pytest.raises(IdtoError):
        orbit_camera(**args)


def test_view_word_follows_the_azimuth_like_threestudio():
    azimuths = [0, 44, -44, 45, 90, -90, 135, 136, -136, 180, -180, 200, 350, 400]
    assert view_word(azimuths) == [
        "front", "front", "front", "side", "side", "side", "side", "back", "back", "back", "back",
        "back",  # 200 wraps to -160
        "front",  # 350 wraps to -10
        "front",  # 400 wraps to 40
    ]
    assert view_word(torch.tensor([10.0])) == ["front"]
    assert view_word(170.0) == ["back"]
