"""Hair (or headwear) from the photo: segmented above the face, its colour carried over the scalp to the back.

Segmentation is OpenCV's GrabCut (Rother et al. 2004: iterated graph cuts over colour GMMs) started from the 68
landmarks: the face's landmark hull and everything far outside the head are "not hair", a band above the brows
(where hair or a hat sits) is "probably hair", the rest is left for the cut to decide. What comes out is kept
only where it is connected to the band above the forehead, and only when its colour differs from the skin's
(CIEDE2000 > ``MIN_CONTRAST``): a bald head or a skin-coloured background gives no hair.

On the head, the hair covers the scalp above a hairline that starts at the height the photo shows it (the
lowest hair seen over the forehead, :func:`hairline_height`) and drops smoothly toward the back, to the nape
(nose-base height), the way hair grows. Texels there that no photo sees well are pulled toward the hair's
median colour instead of the skin tone (``photo_texture``'s fill).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MIN_CONTRAST = 10.0   # CIEDE2000 between hair and skin medians below which no hair is reported
_WORK_SIDE = 256      # GrabCut runs on the photo downscaled to this long side
_ITERATIONS = 5


@dataclass
class Hair:
    mask: np.ndarray                       # [H, W] bool, in the photo's pixels
    tone: tuple[float, float, float]       # sRGB median of the hair pixels, in [0, 1]


def _delta_e(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.color import deltaE_ciede2000, rgb2lab

    lab = rgb2lab(np.stack([a, b])[None].astype(np.float64))[0]
    return float(deltaE_ciede2000(lab[0], lab[1]))


def _seed_mask(shape: tuple[int, int], lm: np.ndarray) -> np.ndarray:
    import cv2
    from skimage.draw import polygon2mask
    from scipy.spatial import ConvexHull

    h, w = shape
    brows = lm[17:27]
    chin = lm[8]
    fh = float(np.linalg.norm(brows.mean(0) - chin))  # brow-to-chin height
    x0, x1 = lm[:, 0].min(), lm[:, 0].max()
    fw = x1 - x0
    mask = np.full(shape, cv2.GC_PR_BGD, np.uint8)
    rows, cols = np.mgrid[0:h, 0:w]
    top = brows[:, 1].min()
    # Far outside the head: not hair.
    head = (cols > x0 - 0.45 * fw) & (cols < x1 + 0.45 * fw) & (rows > top - 1.1 * fh) & (rows < chin[1])
    mask[~head] = cv2.GC_BGD
    # Probably hair: a band from a little above the brows up, over the face's width.
    band = (cols > x0 + 0.1 * fw) & (cols < x1 - 0.1 * fw) & (rows < top - 0.25 * fh) & (rows > top - 0.75 * fh)
    mask[band] = cv2.GC_PR_FGD
    # The face (landmark hull, brows up to their line): skin, not hair.
    hull = lm[ConvexHull(lm).vertices]
    mask[polygon2mask(shape, hull[:, ::-1])] = cv2.GC_BGD
    return mask


def segment_hair(image: np.ndarray, landmarks: np.ndarray, skin: np.ndarray | None = None) -> Hair | None:
    """Hair (or headwear) above the face of an RGB ``uint8`` photo with its 68 dlib ``landmarks``; None when
    none is found (too few pixels, or no colour contrast with ``skin``, sRGB [3] in [0, 1])."""
    import cv2
    from scipy import ndimage

    H, W = image.shape[:2]
    s = min(1.0, _WORK_SIDE / max(H, W))
    small = cv2.resize(image, (max(1, round(W * s)), max(1, round(H * s))), interpolation=cv2.INTER_AREA)
    lm = (np.asarray(landmarks, dtype=np.float64) + 0.5) * s - 0.5
    mask = _seed_mask(small.shape[:2], lm)
    if not (mask == cv2.GC_PR_FGD).any():
        return None
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)
    cv2.grabCut(np.ascontiguousarray(small[..., ::-1]), mask, None, bgd, fgd, _ITERATIONS, cv2.GC_INIT_WITH_MASK)
    hair = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
    label, _ = ndimage.label(hair)
    seeds = np.unique(label[_seed_mask(small.shape[:2], lm) == cv2.GC_PR_FGD])
    hair = np.isin(label, seeds[seeds > 0])
    if hair.sum() < 0.002 * hair.size:
        return None
    tone = np.median(small[hair].astype(np.float64) / 255.0, axis=0)
    if skin is not None and _delta_e(tone, np.asarray(skin, dtype=np.float64)) < MIN_CONTRAST:
        return None
    full = cv2.resize(hair.astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST).astype(bool)
    return Hair(full, (float(tone[0]), float(tone[1]), float(tone[2])))


FRONT_DEGREES = 40.0  # the hairline over the forehead is read within this azimuth of the front


def forehead_side(points: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: the points within ``FRONT_DEGREES`` of azimuth of the front (+Z), where the hairline is read."""
    return torch.atan2(points[:, 0], points[:, 2]).abs() < np.radians(FRONT_DEGREES)


def hairline_height(points: torch.Tensor, seen_hair: torch.Tensor, front: torch.Tensor) -> float | None:
    """The height (working-space y) of the lowest hair seen over the forehead: the 5th percentile of the y of
    front-facing surface points (``front``) that a photo shows as hair (``seen_hair``)."""
    sel = seen_hair & front
    if int(sel.sum()) < 10:
        return None
    return float(torch.quantile(points[sel, 1], 0.05))


def hairline_at(points: torch.Tensor, hairline: float, nape: float) -> torch.Tensor:
    """``[N]`` the hairline's height at the azimuth of each point: ``hairline`` over the face, dropping to
    ``nape`` at the back (smoothly between 60 and 150 degrees of azimuth about the vertical axis)."""
    azimuth = torch.atan2(points[:, 0], points[:, 2]).abs()
    t = ((azimuth - np.radians(60)) / np.radians(90)).clamp(0.0, 1.0)
    return hairline + (nape - hairline) * t * t * (3 - 2 * t)


def scalp(points: torch.Tensor, hairline: float, nape: float) -> torch.Tensor:
    """``[N]`` bool: surface points on the scalp, above the hairline (:func:`hairline_at`)."""
    return points[:, 1] > hairline_at(points, hairline, nape)


_CHEEKS = ((1, 2, 3, 4, 48, 31, 40, 41, 36), (15, 14, 13, 12, 54, 35, 47, 46, 45))


def cheek_tone(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """``[3]`` sRGB in [0, 1]: the median of the photo's cheek pixels (between the jaw, the nose's wings, the
    lower lids and the mouth's corners), the skin that :func:`segment_hair` compares the hair against."""
    from skimage.draw import polygon2mask

    lm = np.asarray(landmarks, dtype=np.float64)
    mask = np.zeros(image.shape[:2], bool)
    for cheek in _CHEEKS:
        mask |= polygon2mask(image.shape[:2], lm[list(cheek)][:, ::-1])
    pixels = image[mask] if mask.any() else image.reshape(-1, image.shape[-1])
    return np.median(pixels[:, :3].astype(np.float64) / 255.0, axis=0)
