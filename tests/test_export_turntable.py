"""Turntables: the studio lighting, PBR frames of a textured sphere, the PNG grid and the MP4."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from idto3d.core.errors import IdtoError
from idto3d.export import turntable
from idto3d.export.maps import PBRMaps
from idto3d.export.turntable import find_ffmpeg, frame_grid, save_turntable, turntable_frames, write_turntable
from idto3d.texture.uv_atlas import unwrap
from idto3d.render.envmap import pixel_directions, pixel_solid_angles, studio_envmap
from idto3d.render.mesh import Mesh
from idto3d.texture.texels import scatter_texels, texel_map

LUMA = torch.tensor([0.2126, 0.7152, 0.0722])
RED, BLUE = np.array([0.9, 0.1, 0.1]), np.array([0.1, 0.1, 0.9])


def luminance_stats(env) -> tuple[float, float, torch.Tensor]:
    """(solid-angle mean, peak, direction of the peak) of the map's luminance."""
    lum = env.radiance.double() @ LUMA.double()
    dw = pixel_solid_angles(env.height, env.width, torch.float64).expand_as(lum)
    row, col = divmod(int(lum.argmax()), env.width)
    return float((lum * dw).sum() / dw.sum()), float(lum.max()), pixel_directions(env.height, env.width)[row, col]


def test_studio_envmap_is_fixed_hdr_with_the_key_light_in_front():
    env = studio_envmap()
    assert env.radiance.shape == (64, 128, 3) and env.name == "studio"
    assert torch.equal(env.radiance, studio_envmap().radiance)  # no randomness anywhere
    assert torch.isfinite(env.radiance).all() and float(env.radiance.min()) > 0
    mean, peak, where = luminance_stats(env)
    assert peak > 5 * mean  # HDR: lights, not just a grey room
    x, y, z = where.tolist()
    assert z > 0.3 and y > 0.3 and x < 0  # the key: in front of the face (+Z), above, toward -X
    # Neutral white light: the map's average colour is close to grey.
    rgb = (env.radiance.double() * pixel_solid_angles(64, 128, torch.float64).unsqueeze(-1)).sum((0, 1))
    assert float(rgb.max() / rgb.min()) < 1.15
    # Lights are sized in degrees and scaled by irradiance, so resolution barely changes the lighting.
    assert luminance_stats(studio_envmap(32))[0] == pytest.approx(mean, rel=0.03)
    with pytest.raises(IdtoError, match="height"):
        studio_envmap(2)


@pytest.fixture(scope="module")
def sphere_uv():
    s = trimesh.creation.icosphere(subdivisions=3, radius=0.8)
    return unwrap(Mesh(torch.tensor(s.vertices, dtype=torch.float32), torch.tensor(s.faces, dtype=torch.int64)))


@pytest.fixture(scope="module")
def halves_maps(sphere_uv) -> PBRMaps:
    """Baked through the UV atlas: red where the surface has x > 0, blue where x < 0; matte."""
    texels = texel_map(sphere_uv, 128)
    colour = torch.where(texels.points[:, :1] > 0, torch.tensor(RED, dtype=torch.float32),
                         torch.tensor(BLUE, dtype=torch.float32))
    albedo = scatter_texels(colour, texels).numpy()
    return PBRMaps.create(albedo, np.full((128, 128), 0.9), np.zeros((128, 128)))


@pytest.fixture(scope="module")
def sphere_frames(sphere_uv, halves_maps) -> np.ndarray:
    return turntable_frames(sphere_uv, halves_maps, n_views=4, resolution=64, device="cpu")


def side_colours(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean colour (0..1) of the object's pixels in the left and right halves of a frame."""
    f = frame.astype(np.float64) / 255
    fg = (f < 0.97).any(-1)  # the background is white
    half = f.shape[1] // 2
    return f[:, :half][fg[:, :half]].mean(0), f[:, half:][fg[:, half:]].mean(0)


def test_turntable_starts_at_the_front_and_turns_toward_plus_x(sphere_frames):
    frames = sphere_frames
    assert frames.shape == (4, 64, 64, 3) and frames.dtype == np.uint8
    assert 0.2 < ((frames < 247).any(-1)).mean() < 0.8  # the sphere fills part of the frame
    left, right = side_colours(frames[0])
    # Azimuth 0 looks at +Z with +X to the right: red (x > 0) on the right, blue on the left.
    assert right[0] > right[2] + 0.3 and left[2] > left[0] + 0.3
    # Half a turn later the camera is on -Z: the sides swap.
    left, right = side_colours(frames[2])
    assert left[0] > left[2] + 0.3 and right[2] > right[0] + 0.3
    assert np.abs(frames[0].astype(int) - frames[2].astype(int)).mean() > 20
    # A quarter turn (azimuth 90) looks at the +X side: all red.
    red = np.concatenate(side_colours(frames[1]))
    assert red[0] > red[2] + 0.3 and red[3] > red[5] + 0.3


def test_turntable_exposure_keeps_a_grey_surface_near_its_albedo(sphere_uv):
    # The pseudo-albedo exposure (mean luminance 1) makes a Lambertian surface average its albedo over
    # the sphere of normals; the side a camera sees under the studio lights must stay in that ballpark.
    grey = PBRMaps.create(np.full((8, 8, 3), 0.5), np.ones((8, 8)), np.zeros((8, 8)))
    frames = turntable_frames(sphere_uv, grey, n_views=2, resolution=48, background=0.0, device="cpu")
    f = frames.astype(np.float64) / 255
    fg = f.max(-1) > 0.02
    for k in range(2):
        assert 0.3 < f[k][fg[k]].mean() < 0.8, f"view {k}: mean {f[k][fg[k]].mean():.3f} for albedo 0.5"


def test_turntable_renders_in_small_batches(sphere_uv, halves_maps, monkeypatch):
    sizes = []
    real = turntable.render_pseudo_albedo

    def spy(mesh, cameras, *args, **kwargs):
        sizes.append(len(cameras))
        assert kwargs.get("diffuse_only", False) is False  # the full material, specular included
        return real(mesh, cameras, *args, **kwargs)

    monkeypatch.setattr(turntable, "render_pseudo_albedo", spy)
    frames = turntable_frames(sphere_uv, halves_maps, n_views=3, resolution=512, device="cpu")
    assert frames.shape == (3, 512, 512, 3) and sizes == [1, 1, 1]  # one 512 px view at a time
    sizes.clear()
    turntable_frames(sphere_uv, halves_maps, n_views=6, resolution=128, device="cpu")
    assert sum(sizes) == 6 and max(sizes) <= 16


def test_turntable_rejects_bad_arguments(sphere_uv, halves_maps):
    for kwargs, match in (({"n_views": 0}, "views"), ({"resolution": 4}, "resolution"),
                          ({"elevation": 95.0}, "elevation"), ({"background": 2.0}, "background")):
        with pytest.raises(IdtoError, match=match):
            turntable_frames(sphere_uv, halves_maps, **kwargs)
    with pytest.raises(IdtoError, match="uint8"):
        save_turntable(np.zeros((2, 8, 8, 3), np.float32), "unused.png")


def test_png_grid_has_at_most_six_frames_per_row(tmp_path):
    frames = np.stack([np.full((10, 12, 3), 20 * i, np.uint8) for i in range(12)])
    assert frame_grid(frames).shape == (20, 72, 3)  # 2 rows of 6
    assert frame_grid(frames[:4]).shape == (10, 48, 3)  # one row
    grid7 = frame_grid(frames[:7])  # 2 rows of 4, the spare cell white
    assert grid7.shape == (20, 48, 3) and (grid7[10:, 36:] == 255).all() and (grid7[10:, 24:36] == 120).all()
    written = save_turntable(frames, tmp_path / "a_turntable.png")
    assert set(written) == {"png"}
    with Image.open(written["png"]) as im:
        assert im.size == (72, 20) and im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im)[10:, 12:24], frames[7])


def test_no_ffmpeg_means_png_only(tmp_path, monkeypatch):
    monkeypatch.setattr(turntable, "find_ffmpeg", lambda: None)
    written = save_turntable(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "t.png", tmp_path / "t.mp4")
    assert set(written) == {"png"} and not (tmp_path / "t.mp4").exists()


def test_find_ffmpeg_prefers_path_then_imageio(monkeypatch):
    monkeypatch.setattr(turntable.shutil, "which", lambda name: "/opt/bin/ffmpeg" if name == "ffmpeg" else None)
    assert find_ffmpeg() == "/opt/bin/ffmpeg"
    monkeypatch.setattr(turntable.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # the package is not installed
    assert find_ffmpeg() is None


def test_mp4_decodes_to_every_frame(tmp_path):
    if find_ffmpeg() is None:
        pytest.skip("no ffmpeg on PATH and imageio-ffmpeg is not installed")
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")  # its reader decodes the file back
    rng = np.random.default_rng(0)
    # Odd sizes: yuv420p needs even ones, so the writer pads by one pixel.
    frames = np.repeat(np.repeat(rng.integers(0, 256, (5, 8, 11, 3), dtype=np.uint8), 4, 1), 4, 2)[:, :31, :43]
    written = save_turntable(frames, tmp_path / "h_turntable.png", tmp_path / "h_turntable.mp4", fps=10)
    mp4 = written["mp4"]
    data = mp4.read_bytes()
    assert len(data) > 100 and data[4:8] == b"ftyp"
    reader = imageio_ffmpeg.read_frames(str(mp4))
    meta = next(reader)
    assert tuple(meta["size"]) == (44, 32) and meta["fps"] == pytest.approx(10)
    decoded = [np.frombuffer(buf, np.uint8).reshape(32, 44, 3) for buf in reader]
    assert len(decoded) == len(frames)
    err = np.mean([np.abs(d[:31, :43].astype(int) - f.astype(int)).mean() for d, f in zip(decoded, frames)])
    assert err < 25  # lossy and chroma-subsampled, but the same pictures in the same order
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h_turntable.mp4", "h_turntable.png"]


def test_failing_ffmpeg_raises_and_leaves_no_mp4(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "ffmpeg"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'Unknown encoder libx264' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(turntable, "find_ffmpeg", lambda: str(fake))
    out = tmp_path / "out"
    with pytest.raises(IdtoError, match="Unknown encoder libx264"):
        save_turntable(np.zeros((3, 16, 16, 3), np.uint8), out / "x.png", out / "x.mp4")
    assert sorted(p.name for p in out.iterdir()) == ["x.png"]  # no mp4, no temporary file


def test_write_turntable_names_files_after_the_expression(tmp_path, sphere_uv, halves_maps, monkeypatch):
    monkeypatch.setattr(turntable, "find_ffmpeg", lambda: None)
    written = write_turntable(tmp_path, "smile", sphere_uv, halves_maps, n_views=2, resolution=32, video=True)
    assert written == {"png": tmp_path / "smile_turntable.png"}
    with Image.open(written["png"]) as im:
        assert im.size == (64, 32)
    with pytest.raises(IdtoError, match="safe file name"):
        write_turntable(tmp_path, "../up", sphere_uv, halves_maps, n_views=2, resolution=32, video=False)
    assert math.isclose(turntable.camera_radius(sphere_uv.vertices), turntable.DEFAULT_RADIUS)
    assert turntable.camera_radius(sphere_uv.vertices * 3) > turntable.DEFAULT_RADIUS  # big meshes still fit
