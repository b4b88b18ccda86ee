"""Colour checks on an exported offline head: does the unseen skin match the face, does the scalp take the hair?

Regions are found from the face model's landmark vertices of the export (``RUN/geometry/head_landmarks.json``):
*face skin* is the vertices within 2 cm of the two cheek points (the centres of the nose wing, the outer eye
corner and the mouth corner on each side: landmarks 31/36/48 and 35/45/54); *neck* is everything 3 cm or more
below the chin (landmark 8) and 2 cm or more above the neck's cut; *top and back* is everything 4 cm or more above
the brows plus the back of the head (10 cm or more behind the outer eye corners, about 2 cm behind the ears)
above eye height. Only landmarks the stitched face keeps are used: the jaw contour's outer ones (0-4, 12-16) lie
behind the face's cut and are -1 in ``head_landmarks.json`` (an earlier version read them, i.e. the last vertex). Each region's colour is the per-channel median of the exported albedo
sampled at its vertices' UVs, compared in CIELAB with CIEDE2000 (``skimage.color.deltaE_ciede2000``).
"""

from __future__ import annotations

import numpy as np

from idto3d.core.errors import IdtoError
from idto3d.core.units import METRES_PER_UNIT

_USED = (8, *range(17, 27), 31, 35, 36, 45, *range(36, 48), 48, 54)  # the landmarks the regions are built from


def _lab(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    return rgb2lab(np.asarray(rgb, dtype=np.float64).reshape(1, -1, 3))[0]


def delta_e(a: np.ndarray, b: np.ndarray) -> float:
    """CIEDE2000 between two sRGB colours in [0, 1]."""
    from skimage.color import deltaE_ciede2000

    lab = _lab(np.stack([a, b]))
    return float(deltaE_ciede2000(lab[0], lab[1]))


def vertex_colours(uvs: np.ndarray, albedo: np.ndarray) -> np.ndarray:
    """``[V, 3]`` sRGB in [0, 1]: the albedo image (row 0 at the top, v = 1) at each vertex's UV (nearest)."""
    h, w = albedo.shape[:2]
    col = np.clip((uvs[:, 0] * w).astype(np.int64), 0, w - 1)
    row = np.clip(((1.0 - uvs[:, 1]) * h).astype(np.int64), 0, h - 1)
    img = albedo[..., :3].astype(np.float64)
    return img[row, col] / (255.0 if albedo.dtype == np.uint8 else 1.0)


def regions(vertices_m: np.ndarray, landmark_vertices: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean vertex masks ``face_skin``, ``neck`` and ``top_back`` (vertices in metres, +Y up, face to +Z)."""
    v = np.asarray(vertices_m, dtype=np.float64)
    lm = v[np.asarray(landmark_vertices)]
    idx = np.asarray(landmark_vertices)
    if (idx[list(_USED)] < 0).any():
        raise IdtoError(f"the export lacks landmarks {sorted(int(i) for i in _USED if idx[i] < 0)}: no colour regions")
    cheeks = [lm[[31, 36, 48]].mean(0), lm[[35, 45, 54]].mean(0)]
    face = np.zeros(len(v), dtype=bool)
    for c in cheeks:
        face |= np.linalg.norm(v - c, axis=1) < 0.02
    bottom = v[:, 1].min()
    neck = (v[:, 1] < lm[8, 1] - 0.03) & (v[:, 1] > bottom + 0.02)
    brow_y = lm[17:27, 1].mean()
    eye_y = lm[36:48, 1].mean()
    back = (v[:, 2] < lm[[36, 45], 2].mean() - 0.10) & (v[:, 1] > eye_y)
    top = v[:, 1] > brow_y + 0.04
    return {"face_skin": face, "neck": neck, "top_back": top | back}


def colour_report(vertices_units: np.ndarray, uvs: np.ndarray, albedo: np.ndarray, landmark_vertices: np.ndarray,
                  hair_tone: tuple[float, float, float] | None = None) -> dict[str, float | list[float]]:
    """Median colours of the regions, ``skin_delta_e`` (face skin vs neck) and, given the segmented hair's
    median ``hair_tone``, ``hair_delta_e`` (top and back vs it)."""
    colours = vertex_colours(uvs, albedo)
    masks = regions(np.asarray(vertices_units) * METRES_PER_UNIT, landmark_vertices)
    med = {k: np.median(colours[m], axis=0) for k, m in masks.items()}
    out: dict[str, float | list[float]] = {f"{k}_srgb": [round(float(c), 4) for c in med[k]] for k in med}
    out["skin_delta_e"] = delta_e(med["face_skin"], med["neck"])
    if hair_tone is not None:
        out["hair_delta_e"] = delta_e(med["top_back"], np.asarray(hair_tone))
    return out
