"""ArcFace-template alignment and face choice."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.transform import SimilarityTransform

from idto3d.core.errors import IdtoError
from idto3d.identity.align import ARCFACE_DST, estimate_norm, norm_crop
from idto3d.identity.faces import Face, choose_face, sort_by_size


def _face(x0, y0, size, score=1.0):
    return Face(box=np.array([x0, y0, x0 + size, y0 + size], np.float32), score=score,
                landmarks5=np.zeros((5, 2), np.float32))


def test_norm_crop_puts_landmarks_on_the_template():
    # Landmarks = template under a known similarity (scale 2.3, 25 degrees, shifted); a bright
    # blob at each one must land on the template after alignment.
    known = SimilarityTransform(scale=2.3, rotation=np.deg2rad(25), translation=(140, 60))
    lmk = known(ARCFACE_DST)
    img = np.zeros((480, 520, 3), np.uint8)
    yy, xx = np.mgrid[:480, :520]
    for x, y in lmk:
        img[(xx - x) ** 2 + (yy - y) ** 2 <= 9] = 255
    tform = estimate_norm(lmk)
    np.testing.assert_allclose(tform.params, np.linalg.inv(known.params), atol=1e-6)
    crop = norm_crop(img, lmk)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    for x, y in ARCFACE_DST:
        win = crop[int(y) - 4:int(y) + 6, int(x) - 4:int(x) + 6, 0].astype(float)
        cy, cx = np.unravel_index(np.argmax(win), win.shape)
        assert win.max() > 150
        assert abs(int(y) - 4 + cy - y) <= 1.5 and abs(int(x) - 4 + cx - x) <= 1.5


def test_degenerate_landmarks_raise():
    with pytest.raises(IdtoError, match="degenerate"):
        norm_crop(np.zeros((50, 50, 3), np.uint8), np.ones((5, 2)))


def test_choice_is_the_largest_and_reports_similar_sizes():
    faces = [_face(0, 0, 50), _face(100, 0, 100), _face(300, 0, 95)]
    c = choose_face(faces, None, "group.jpg")
    assert c.index == 0 and c.face.size == 100 and c.ambiguous
    assert "--face-index" in c.note and "group.jpg" in c.note
    c2 = choose_face(faces, 2, "group.jpg")
    assert c2.face.size == 50 and not c2.ambiguous
    with pytest.raises(IdtoError, match="out of range"):
        choose_face(faces, 3, "group.jpg")
    alone = choose_face([_face(0, 0, 100), _face(200, 0, 40)], None, "x.jpg")
    assert not alone.ambiguous and alone.note == ""
    with pytest.raises(IdtoError, match="no face found"):
        choose_face([], None, "empty.jpg")


def test_weak_detections_rank_after_confident_ones():
    real, spurious = _face(0, 0, 80, score=1.2), _face(200, 200, 110, score=0.05)
    assert sort_by_size([spurious, real], confident_score=0.3)[0] is real
    c = choose_face([spurious, real], None, "p.jpg", confident_score=0.3)
    assert c.face is real and not c.ambiguous
