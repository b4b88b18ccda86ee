"""The offline dlib backend on real photos: same person stays close, different people stay apart."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from identity_models import astronaut, insightface_photo
from idto3d.identity.dlib_backend import DlibBackend
from idto3d.identity.embedder import identity_distance, l2_normalise
from idto3d.identity.faces import choose_face, sort_by_size


def _jpeg(a: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf))


def _rotate(a: np.ndarray, deg: float) -> np.ndarray:
    return np.asarray(Image.fromarray(a).rotate(deg, resample=Image.Resampling.BICUBIC))


@pytest.fixture(scope="module")
def backend() -> DlibBackend:
    return DlibBackend()


def _embed(backend, image, index=None):
    image = np.ascontiguousarray(image)
    faces = sort_by_size(backend.detect(image), backend.confident_score)
    choice = choose_face(faces, index, "photo", backend.confident_score)
    return l2_normalise(backend.embed(backend.align(image, choice.face))), choice.face


@pytest.fixture(scope="module")
def astronaut_variants(backend) -> dict[str, np.ndarray]:
    a = astronaut()
    variants = {
        "original": a,
        "flip": a[:, ::-1],
        "crop": a[40:300, 100:360],
        "rotate 15": _rotate(a, 15),
        "rotate -12": _rotate(a, -12),
        "jpeg q20": _jpeg(a, 20),
        "dark x0.35": (a * 0.35).astype(np.uint8),
        "half size": np.asarray(Image.fromarray(a).resize((256, 256))),
        "flip+rotate+dark+jpeg": _jpeg((_rotate(a[:, ::-1], 10) * 0.5).astype(np.uint8), 30),
    }
    return {k: _embed(backend, v)[0] for k, v in variants.items()}


@pytest.fixture(scope="module")
def other_people(backend) -> dict[str, np.ndarray]:
    out = {"Tom Hanks": _embed(backend, np.asarray(Image.open(insightface_photo("Tom_Hanks_54745.png"))
                                                    .convert("RGB")))[0]}
    group = np.asarray(Image.open(insightface_photo("t1.jpg")).convert("RGB"))
    faces = backend.detect(group)
    assert len(faces) == 6  # six people in the group photo
    for i, f in enumerate(sort_by_size(faces, backend.confident_score)):
        out[f"t1 face {i}"] = l2_normalise(backend.embed(backend.align(group, f)))
    return out


def test_same_person_under_edits_stays_within_threshold(backend, astronaut_variants):
    ref = astronaut_variants["original"]
    for name, emb in astronaut_variants.items():
        assert emb.shape == (128,)
        d = float(identity_distance(emb, ref))
        assert d < backend.same_person_threshold, f"{name}: {d:.3f}"


def test_different_people_fall_outside_threshold(backend, astronaut_variants, other_people):
    embs = list(other_people.values())
    names = list(other_people)
    for name, emb in other_people.items():
        for vname, v in astronaut_variants.items():
            d = float(identity_distance(emb, v))
            assert d > backend.same_person_threshold, f"{name} vs astronaut {vname}: {d:.3f}"
    for i in range(len(embs)):
        for j in range(i + 1, len(embs)):
            d = float(identity_distance(embs[i], embs[j]))
            assert d > backend.same_person_threshold, f"{names[i]} vs {names[j]}: {d:.3f}"


def test_landmarks_box_and_crops(backend):
    img = astronaut()
    emb, face = _embed(backend, img)
    x0, y0, x1, y1 = face.box
    assert 150 < x0 < x1 < 290 and 50 < y0 < y1 < 190  # the astronaut's face, not her patch
    le, re, nose, lm, rm = face.landmarks5
    assert le[0] < nose[0] < re[0] and lm[0] < rm[0]  # image-left first (ArcFace order)
    assert max(le[1], re[1]) < nose[1] < min(lm[1], rm[1])
    assert np.all((face.landmarks5 >= face.box[:2] - 5) & (face.landmarks5 <= face.box[2:] + 5))
    aligned = backend.align(img, face)
    assert aligned.model_crop.shape == (150, 150, 3) and aligned.arcface_crop.shape == (112, 112, 3)
    # dlib embeds the saved chip itself: re-embedding the saved array gives the same vector
    np.testing.assert_allclose(l2_normalise(backend.embed(aligned)), emb, atol=1e-6)


def test_large_photo_is_downscaled_for_detection_but_boxes_stay_in_photo_pixels(backend):
    big = np.asarray(Image.fromarray(astronaut()).resize((2048, 2048), Image.Resampling.BICUBIC))
    small_face = _embed(backend, astronaut())[1]
    emb, face = _embed(backend, big)
    np.testing.assert_allclose(face.box, small_face.box * 4, atol=24)
    assert float(identity_distance(emb, _embed(backend, astronaut())[0])) < backend.same_person_threshold


def test_no_face_returns_empty(backend):
    rng = np.random.default_rng(0)
    assert backend.detect((rng.random((200, 300, 3)) * 40).astype(np.uint8)) == []
