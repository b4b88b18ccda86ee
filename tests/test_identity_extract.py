"""compute_identity end to end on real photos: the identity file, quality flags, outliers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from identity_models import astronaut, insightface_photo
from idto3d.core.config import IdentityConfig
from idto3d.core.errors import IdtoError
from idto3d.identity.extract import compute_identity
from idto3d.identity.io import FORMAT, IdentityFileError, load_identity


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("photos")
    a = astronaut()
    out = {}

    def save(name, arr, **kw):
        out[name] = d / name
        Image.fromarray(arr).save(out[name], **kw)

    save("astronaut.png", a)
    save("flip.jpg", np.ascontiguousarray(a[:, ::-1]), quality=70)
    save("dark.webp", (a * 0.4).astype(np.uint8), quality=80)
    exif = Image.Exif()
    exif[0x0112] = 8  # stored turned 90 deg clockwise; viewers rotate it back
    save("exif.jpg", np.ascontiguousarray(np.rot90(a, -1)), quality=95, exif=exif)
    save("small.png", np.asarray(Image.fromarray(a).resize((200, 200))))
    save("blurry.png", np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(2.5))))
    save("noface.png", np.full((120, 160, 3), 90, np.uint8))
    out["tom"] = insightface_photo("Tom_Hanks_54745.png")
    out["group"] = insightface_photo("t1.jpg")
    return out


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=300), buf


def test_identity_file_follows_the_contract(tmp_path, photos):
    out = tmp_path / "me.safetensors"
    ident = compute_identity([photos["astronaut.png"], photos["flip.jpg"], photos["dark.webp"], photos["exif.jpg"]],
                             out, IdentityConfig(), show_progress=False)
    tensors = load_file(str(out))
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == FORMAT and meta["backend"] == "dlib" and meta["dim"] == "128"
    assert {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} == {
        "embedding": ((128,), torch.float32), "embeddings": ((4, 128), torch.float32),
        "used": ((4,), torch.uint8), "boxes": ((4, 4), torch.float32), "landmarks": ((4, 5, 2), torch.float32)}
    e = tensors["embeddings"]
    torch.testing.assert_close(e.norm(dim=1), torch.ones(4))
    mean = e.mean(0)
    torch.testing.assert_close(tensors["embedding"], mean / mean.norm())
    photos_meta = json.loads(meta["photos"])
    assert [Path(p["path"]).name for p in photos_meta] == ["astronaut.png", "flip.jpg", "dark.webp", "exif.jpg"]
    for p in photos_meta:
        assert p["quality"] == "ok" and p["n_faces"] >= 1 and p["used"]
        crop = Image.open(out.parent / p["crop"])
        assert crop.size == (150, 150)
        assert Image.open(out.parent / p["crop_arcface"]).size == (112, 112)
        assert p["crop"].startswith("me_crops/")
    # EXIF rotation applied before detection: same box as the upright photo
    np.testing.assert_allclose(tensors["boxes"][3], tensors["boxes"][0], atol=3)
    loaded = load_identity(out)
    assert loaded.dim == 128 and loaded.backend == "dlib" and loaded.n_photos == 4
    torch.testing.assert_close(loaded.embedding, ident.embedding)
    assert loaded.used.dtype == torch.bool and bool(loaded.used.all())


def test_outlier_reported_then_dropped(tmp_path, photos):
    inputs = [photos["astronaut.png"], photos["flip.jpg"], photos["dark.webp"], photos["tom"]]
    con, buf = _console()
    kept = compute_identity(inputs, tmp_path / "a.safetensors", IdentityConfig(), console=con, show_progress=False)
    assert "Tom_Hanks_54745.png" in buf.getvalue() and "--drop-outliers" in buf.getvalue()
    assert [p["quality"] for p in kept.photos] == ["ok", "ok", "ok", "outlier"]
    assert bool(kept.used.all())
    loo = [p["loo_distance"] for p in kept.photos]
    assert max(loo[:3]) < 0.4 < loo[3]

    dropped = compute_identity(inputs, tmp_path / "b.safetensors", IdentityConfig(), drop_outliers=True,
                               show_progress=False)
    assert dropped.used.tolist() == [True, True, True, False]
    m = dropped.embeddings[:3].mean(0)
    torch.testing.assert_close(dropped.embedding, m / m.norm())
    assert load_identity(tmp_path / "b.safetensors").used.tolist() == [True, True, True, False]


def test_two_photos_of_different_people_are_reported(tmp_path, photos):
    con, buf = _console()
    ident = compute_identity([photos["astronaut.png"], photos["tom"]], tmp_path / "x.safetensors",
                             IdentityConfig(), console=con, show_progress=False)
    assert "may not show the same person" in buf.getvalue()
    assert all("may not be the same person" in p["quality"] for p in ident.photos)
    same = compute_identity([photos["astronaut.png"], photos["flip.jpg"]], None, IdentityConfig(),
                            show_progress=False)
    assert [p["quality"] for p in same.photos] == ["ok", "ok"]


def test_group_photo_choice_and_face_index(tmp_path, photos):
    con, buf = _console()
    ident = compute_identity([photos["group"]], tmp_path / "g.safetensors", IdentityConfig(), console=con,
                             show_progress=False)
    p = ident.photos[0]
    assert p["n_faces"] == 6 and p["face_index"] == 0 and "several faces" in p["quality"]
    assert "--face-index" in buf.getvalue()
    assert (tmp_path / p["faces_overview"]).is_file()
    third = compute_identity([photos["group"]], None, IdentityConfig(), face_index=3, show_progress=False)
    assert third.photos[0]["face_index"] == 3
    assert not torch.allclose(third.boxes[0], ident.boxes[0])
    assert float((third.embedding - ident.embedding).norm()) > 0.4
    with pytest.raises(IdtoError, match="out of range"):
        compute_identity([photos["group"]], None, IdentityConfig(face_index=6), show_progress=False)


def test_quality_flags_small_and_blurry(photos):
    ident = compute_identity([photos["small.png"], photos["blurry.png"]], None, IdentityConfig(),
                             show_progress=False)
    assert "small face" in ident.photos[0]["quality"]
    assert "blurry" in ident.photos[1]["quality"] and "small" not in ident.photos[1]["quality"]


def test_more_than_five_photos_warn_but_work(tmp_path, photos):
    con, buf = _console()
    ident = compute_identity([photos["astronaut.png"]] * 6, None, IdentityConfig(save_crops=False), console=con,
                             show_progress=False)
    assert "6 photos" in buf.getvalue() and "up to 5" in buf.getvalue()
    assert ident.n_photos == 6 and bool(ident.used.all())


def test_failure_leaves_no_output(tmp_path, photos):
    out = tmp_path / "never.safetensors"
    with pytest.raises(IdtoError, match="no face found"):
        compute_identity([photos["astronaut.png"], photos["noface.png"]], out, IdentityConfig(),
                         show_progress=False)
    assert not out.exists() and not (tmp_path / "never_crops").exists()


def test_load_identity_rejects_other_files(tmp_path):
    with pytest.raises(IdentityFileError, match="not found"):
        load_identity(tmp_path / "missing.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(other))
    with pytest.raises(IdentityFileError, match="not an idto3d identity file"):
        load_identity(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"12345678 not safetensors")
    with pytest.raises(IdentityFileError, match="not a readable safetensors"):
        load_identity(junk)
