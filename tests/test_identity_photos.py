"""Photo loading: formats, EXIF orientation, colour modes, downscaling, path errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from identity_models import astronaut
from idto3d.identity.photos import PhotoError, collect_photos, downscale, load_photo


@pytest.fixture(scope="module")
def small() -> np.ndarray:
    return np.asarray(Image.fromarray(astronaut()).resize((96, 64)))


@pytest.mark.parametrize("fmt,suffix,tol", [("JPEG", ".jpg", 12.0), ("PNG", ".png", 0.0),
                                            ("WEBP", ".webp", 0.0), ("BMP", ".bmp", 0.0)])
def test_formats_decode_to_rgb(tmp_path, small, fmt, suffix, tol):
    path = tmp_path / f"p{suffix}"
    kw = {"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}
    Image.fromarray(small).save(path, format=fmt, **kw)
    got = load_photo(path)
    assert got.dtype == np.uint8 and got.shape == small.shape
    assert np.abs(got.astype(float) - small).mean() <= tol


def test_exif_orientation_is_applied(tmp_path, small):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored pixels are the upright photo turned CCW
    Image.fromarray(np.rot90(small, 1).copy()).save(path, quality=98, exif=exif)
    got = load_photo(path)
    assert got.shape == small.shape
    assert np.abs(got.astype(float) - small).mean() < 6.0


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16", "LA"])
def test_colour_modes_become_rgb(tmp_path, small, mode):
    if mode == "I;16":
        src = Image.fromarray((np.asarray(Image.fromarray(small).convert("L")).astype(np.uint16) * 257))
        assert src.mode.startswith("I;16")
    else:
        src = Image.fromarray(small).convert(mode)
    path = tmp_path / ("p.tif" if mode in ("CMYK", "I;16") else "p.png")
    src.save(path)
    got = load_photo(path)
    assert got.shape == small.shape and got.dtype == np.uint8
    grey = np.asarray(Image.fromarray(small).convert("L"), dtype=float)
    # Content survives (up to colour-space conversion): correlates strongly with the original.
    assert np.corrcoef(got.mean(-1).ravel(), grey.ravel())[0, 1] > 0.95


def test_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:16, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    got = load_photo(tmp_path / "a.png")
    assert (got[:16] == [200, 0, 0]).all() and (got[16:] == 255).all()


def test_downscale_keeps_aspect_and_reports_scale():
    img = np.zeros((3000, 2000, 3), np.uint8)
    small, scale = downscale(img, 1024)
    assert small.shape == (1024, 683, 3)
    assert scale == pytest.approx(1024 / 3000, rel=2e-3)
    same, s1 = downscale(img[:100, :100], 1024)
    assert s1 == 1.0 and same.shape == (100, 100, 3)


def test_collect_photos_expands_folders_and_checks_paths(tmp_path, small):
    folder = tmp_path / "set"
    folder.mkdir()
    for n in ("b.png", "a.JPG"):
        Image.fromarray(small).save(folder / n, format="PNG" if n.endswith("png") else "JPEG")
    (folder / "notes.txt").write_text("not a photo")
    single = tmp_path / "c.webp"
    Image.fromarray(small).save(single)
    got = collect_photos([folder, single])
    assert [p.name for p in got] == ["a.JPG", "b.png", "c.webp"]

    with pytest.raises(PhotoError, match="not found"):
        collect_photos([tmp_path / "missing.jpg"])
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(PhotoError, match="no images"):
        collect_photos([empty_dir])
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(PhotoError, match="empty file"):
        collect_photos([tmp_path / "zero.jpg"])
    with pytest.raises(PhotoError, match="no photos"):
        collect_photos([])


def test_unreadable_and_truncated_files(tmp_path, small):
    text = tmp_path / "fake.jpg"
    text.write_text("hello, I am not a JPEG")
    with pytest.raises(PhotoError, match="not an image"):
        load_photo(text)
    full = tmp_path / "full.jpg"
    Image.fromarray(small).save(full, quality=95)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[:200])
    with pytest.raises(PhotoError):
        load_photo(cut)
