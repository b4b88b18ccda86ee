"""Hair from the photo (texture/hair.py): GrabCut from the landmarks finds the astronaut's hair above her face,
not her face and not the background; a photo with no hair gives none; the scalp region drops toward the back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idto3d.core.errors import IdtoError
from idto3d.evaluate.asset_colour import delta_e
from idto3d.texture.hair import scalp, segment_hair


@pytest.fixture(scope="module")
def astronaut():
    from skimage import data

    from idto3d.face_model.landmarks import detect_landmarks68

    img = data.astronaut()
    return img, detect_landmarks68(img)


def test_grabcut_finds_the_hair_above_the_face(astronaut):
    img, lm = astronaut
    skin = np.median(img[200:240, 200:240].reshape(-1, 3) / 255.0, axis=0)  # her cheeks and nose
    hair = segment_hair(img, lm, skin)
    assert hair is not None
    brow_top = lm[17:27, 1].min()
    rows = np.nonzero(hair.mask.any(1))[0]
    # Hair: above the brows, over the face's width; the face (landmark hull) is not hair; nor is the flag,
    # the suit or the wall (the mask stays within the head's width).
    from skimage.draw import polygon2mask
    from scipy.spatial import ConvexHull

    face = polygon2mask(img.shape[:2], lm[ConvexHull(lm).vertices][:, ::-1])
    print(f"hair: {hair.mask.mean():.3f} of the photo, rows {rows.min()}-{rows.max()}, tone {hair.tone}, "
          f"on the face {(hair.mask & face).sum() / face.sum():.3f}")
    assert (hair.mask & face).sum() < 0.02 * face.sum()
    band = hair.mask[int(brow_top - 60):int(brow_top - 20), int(lm[:, 0].min()):int(lm[:, 0].max())]
    assert band.mean() > 0.7
    cols = np.nonzero(hair.mask.any(0))[0]
    face_w = lm[:, 0].max() - lm[:, 0].min()
    assert cols.min() > lm[:, 0].min() - 0.6 * face_w and cols.max() < lm[:, 0].max() + 0.6 * face_w
    assert delta_e(np.asarray(hair.tone), skin) > 20


def test_no_hair_when_it_is_skin_coloured(astronaut):
    img, lm = astronaut
    bald = img.copy()
    skin = np.median(img[200:240, 200:240].reshape(-1, 3), axis=0)
    bald[: int(lm[17:27, 1].min()) - 5, 130:330] = skin.astype(np.uint8)  # paint the scalp the skin's colour
    assert segment_hair(bald, lm, skin / 255.0) is None


def test_scalp_drops_toward_the_back():
    pts = torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.2, 0.5], [0.0, 0.2, -0.5], [0.5, 0.25, 0.0], [0.0, -0.3, -0.5]])  # the side: line at 0.30
    got = scalp(pts, hairline=0.4, nape=0.0)
    assert got.tolist() == [True, False, True, False, False]


def test_colour_regions_read_only_the_landmarks_the_stitched_face_keeps():
    """The stitched face is cut in front of the ears, so the jaw contour's outer landmarks are -1; the regions must
    not read them (as index -1, the last vertex): moving the last vertex moves no region but its own."""
    from idto3d.evaluate.asset_colour import regions

    rng = np.random.default_rng(0)
    v = rng.normal(size=(4000, 3))
    v = 0.1 * v / np.linalg.norm(v, axis=1, keepdims=True)  # a 10 cm ball, +Y up, face to +Z
    front = np.nonzero(v[:, 2] > 0.05)[0]
    landmarks = rng.choice(front[:-1], 68, replace=False)
    landmarks[[0, 1, 2, 3, 4, 12, 13, 14, 15, 16]] = -1
    before = regions(v, landmarks)
    moved = v.copy()
    moved[-1] = moved[landmarks[30]]  # the last vertex onto the nose
    after = regions(moved, landmarks)
    for name in before:
        assert np.array_equal(before[name][:-1], after[name][:-1]), name
    landmarks[31] = -1
    with pytest.raises(IdtoError, match="lacks landmarks"):
        regions(v, landmarks)
