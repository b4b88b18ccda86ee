"""Claims about environment maps: file round trips, clear errors, Y rotation, procedural skies."""

import math
import os

import pytest
import torch

from idto3d.render.envmap import (
    EnvironmentMap, EnvMapError, direction_to_uv, load_envmap, load_envmap_folder, pixel_directions,
    pixel_solid_angles, procedural_envmap, random_envmap, rotate_y, sample_equirect, save_exr, save_hdr,
)


def _hdr_image(H: int = 8, W: int = 40) -> torch.Tensor:
    """Flat regions (RLE runs), a gradient (literal dumps), a bright spot and black pixels."""
    g = torch.Generator().manual_seed(3)
    img = torch.rand(H, W, 3, generator=g) * 4
    img[:, :12] = torch.tensor([0.5, 0.25, 2.0])
    img[2, 20] = torch.tensor([500.0, 300.0, 100.0])
    img[-1, -5:] = 0
    return img


@pytest.mark.parametrize("rle", [True, False])
def test_hdr_round_trip_within_rgbe_precision(tmp_path, rle):
    img = _hdr_image()
    path = save_hdr(tmp_path / "a.hdr", img, rle=rle)
    data = path.read_bytes()
    scanline = data[data.index(b"+X 40\n") + 6:]
    assert (scanline[:2] == b"\x02\x02") == rle  # the writer really used the requested layout
    env = load_envmap(path)
    assert env.radiance.shape == (8, 40, 3) and env.radiance.dtype == torch.float32
    # RGBE keeps 8 mantissa bits of the brightest channel: error <= 1/256 of it.
    err = (env.radiance - img).abs() / img.max(-1, keepdim=True).values.clamp(min=1e-6)
    assert float(err.max()) <= 1 / 255
    assert torch.all(env.radiance[-1, -5:] == 0)


def test_hdr_rle_is_smaller_for_flat_images(tmp_path):
    img = torch.ones(16, 64, 3)
    assert save_hdr(tmp_path / "r.hdr", img).stat().st_size < save_hdr(tmp_path / "f.hdr", img, rle=False).stat().st_size / 4


def test_hdr_plus_y_files_are_flipped_to_top_row_first(tmp_path):
    img = _hdr_image()
    data = save_hdr(tmp_path / "a.hdr", img, rle=False).read_bytes().replace(b"-Y 8 +X 40", b"+Y 8 +X 40")
    # Reverse the scanline order on disk: a +Y file stores the bottom row first.
    header, pixels = data[:data.index(b"+X 40\n") + 6], data[data.index(b"+X 40\n") + 6:]
    rows = [pixels[i * 160:(i + 1) * 160] for i in range(8)]
    (tmp_path / "b.hdr").write_bytes(header + b"".join(rows[::-1]))
    assert torch.equal(load_envmap(tmp_path / "b.hdr").radiance, load_envmap(tmp_path / "a.hdr").radiance)


@pytest.mark.parametrize("mangle, message", [
    (lambda d: b"", "empty"),
    (lambda d: b"P6\n3 3\n255\n" + d[40:], "signature"),
    (lambda d: d.replace(b"32-bit_rle_rgbe", b"32-bit_rle_xyze"), "pixel format"),
    (lambda d: d.replace(b"-Y 8 +X 40", b"-Y x +X 40"), "resolution"),
    (lambda d: d[:-50], "truncated"),
    (lambda d: d.replace(b"\n\n", b"\n"), "header"),
])
def test_corrupt_hdr_files_raise_clear_errors(tmp_path, mangle, message):
    data = save_hdr(tmp_path / "ok.hdr", _hdr_image()).read_bytes()
    bad = tmp_path / "bad.hdr"
    bad.write_bytes(mangle(data))
    with pytest.raises(EnvMapError, match=message):
        load_envmap(bad)


def test_corrupt_rle_run_is_reported(tmp_path):
    data = bytearray(save_hdr(tmp_path / "ok.hdr", torch.ones(2, 16, 3)).read_bytes())
    first = data.index(b"+X 16\n") + 6 + 4  # first run byte of the first scanline
    data[first] = 128 + 100  # a run longer than the scanline
    (tmp_path / "bad.hdr").write_bytes(bytes(data))
    with pytest.raises(EnvMapError, match="run-length"):
        load_envmap(tmp_path / "bad.hdr")


def test_exr_round_trip_is_exact(tmp_path):
    pytest.importorskip("OpenEXR")
    img = _hdr_image()
    env = load_envmap(save_exr(tmp_path / "a.exr", img))
    assert torch.equal(env.radiance, img)
    (tmp_path / "bad.exr").write_bytes(b"not an exr at all" * 10)
    with pytest.raises(EnvMapError, match="OpenEXR"):
        load_envmap(tmp_path / "bad.exr")


def test_load_errors_for_missing_and_unsupported_files(tmp_path):
    with pytest.raises(EnvMapError, match="does not exist"):
        load_envmap(tmp_path / "nope.hdr")
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(EnvMapError, match="unsupported"):
        load_envmap(tmp_path / "a.png")


def test_folder_listing_and_errors(tmp_path):
    with pytest.raises(EnvMapError, match="does not exist"):
        load_envmap_folder(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(EnvMapError, match="not a folder"):
        load_envmap_folder(tmp_path / "file.txt")
    with pytest.raises(EnvMapError, match="no .hdr or .exr"):
        load_envmap_folder(tmp_path)
    save_hdr(tmp_path / "b.hdr", _hdr_image())
    save_hdr(tmp_path / "a.HDR", _hdr_image())
    assert [p.name for p in load_envmap_folder(tmp_path)] == ["a.HDR", "b.hdr"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_unreadable_folder_is_a_clear_error(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    save_hdr(folder / "a.hdr", _hdr_image())
    folder.chmod(0)
    try:
        with pytest.raises(EnvMapError, match="cannot read"):
            load_envmap_folder(folder)
    finally:
        folder.chmod(0o755)


def test_uv_convention_centre_is_plus_z_and_three_quarters_is_plus_x():
    uv = direction_to_uv(torch.tensor([[0.0, 0, 1], [1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, -1], [-1, 0, 0]]))
    assert torch.allclose(uv[:2], torch.tensor([[0.5, 0.5], [0.75, 0.5]]), atol=1e-6)
    assert float(uv[2, 1]) < 1e-6 and float(uv[3, 1]) > 1 - 1e-6
    assert float(uv[4, 0]) in (pytest.approx(0.0, abs=1e-6), pytest.approx(1.0, abs=1e-6))  # -Z: the seam
    assert float(uv[5, 0]) == pytest.approx(0.25, abs=1e-6)  # -X
    # pixel_directions and direction_to_uv agree on pixel centres.
    d = pixel_directions(4, 8)
    uv = direction_to_uv(d)
    assert torch.allclose(uv[..., 0] * 8 - 0.5, torch.arange(8.0).expand(4, 8), atol=1e-4)
    assert torch.allclose(pixel_solid_angles(16, 32).sum() * 32, torch.tensor(4 * math.pi, dtype=torch.float32))


def _spot_env(direction, H: int = 16) -> EnvironmentMap:
    rad = torch.full((H, 2 * H, 3), 0.1)
    uv = direction_to_uv(torch.tensor(direction, dtype=torch.float32))
    i, j = int(float(uv[1]) * H), int(float(uv[0]) * 2 * H) % (2 * H)
    rad[i, j] = 100.0
    return EnvironmentMap(rad)


def test_rotate_y_360_is_identity_and_90_moves_plus_z_to_plus_x():
    env = _spot_env([0.0, 0.0, 1.0])
    assert torch.equal(rotate_y(env, 360).radiance, env.radiance)
    turned = rotate_y(env, 90)
    assert float(sample_equirect(turned.radiance, torch.tensor([1.0, 0, 0])).max()) > 20
    assert float(sample_equirect(turned.radiance, torch.tensor([0.0, 0, 1])).max()) < 1
    assert turned.base is env and turned.rotation_deg == 90
    # A fractional shift resamples but preserves total energy.
    half = rotate_y(env, 360 / 64)
    assert torch.allclose(half.radiance.sum(), env.radiance.sum(), rtol=1e-5)


def test_procedural_maps_are_deterministic_finite_positive_with_bright_lights():
    a = procedural_envmap(torch.Generator().manual_seed(7), 32)
    b = procedural_envmap(torch.Generator().manual_seed(7), 32)
    c = procedural_envmap(torch.Generator().manual_seed(8), 32)
    assert torch.equal(a.radiance, b.radiance) and not torch.equal(a.radiance, c.radiance)
    for env in (a, c):
        assert env.radiance.shape == (32, 64, 3)
        assert torch.isfinite(env.radiance).all() and (env.radiance > 0).all()
        lum = env.radiance.mean(-1)
        assert float(lum.max()) > 20 * float(lum.median())  # the sun/area lights stand out of the sky
        # The sky (upper hemisphere, away from lights) is brighter on average than the ground.
        assert float(lum[:8].median()) > float(lum[-8:].median())


def test_random_envmap_is_deterministic_and_uses_files(tmp_path):
    procedural = random_envmap(None, torch.Generator().manual_seed(1), height=16)
    again = random_envmap([], torch.Generator().manual_seed(1), height=16)
    assert torch.equal(procedural.radiance, again.radiance) and procedural.name == "procedural"
    save_hdr(tmp_path / "a.hdr", _hdr_image(16, 32))
    files = load_envmap_folder(tmp_path)
    rotations = set()
    for seed in range(6):
        env = random_envmap(files, torch.Generator().manual_seed(seed), height=8)
        assert env.name == "a.hdr" and env.radiance.shape == (8, 16, 3)
        # Rotations are whole columns, so the map is an exact roll of the base.
        assert torch.equal(env.radiance, torch.roll(env.base.radiance, round(env.rotation_deg / 22.5), 1))
        rotations.add(env.rotation_deg)
    assert len(rotations) > 1
