"""How far each exported expression moves its own region: millimetres measured at the face model's landmark
vertices of the exported meshes (``RUN/geometry/head_landmarks.json`` says which vertices they are).

Each offline expression has one stated effect and the amount it must reach (the issue's bar: smile 8 mm, an
open mouth 15 mm, any other 5 mm). Displacements are taken relative to the nose bridge (landmarks 27-30, which no
offline expression moves), so the export's re-centring of each mesh's bounding box does not count as motion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

_BRIDGE = (27, 28, 29, 30)
_BROWS = tuple(range(17, 27))
_LIDS = ((37, 41), (38, 40), (43, 47), (44, 46))  # (upper, lower) eyelid landmark pairs


@dataclass(frozen=True)
class Effect:
    what: str
    minimum_mm: float
    measure: Callable[[np.ndarray, np.ndarray], float]  # (neutral [68, 3], expression [68, 3]) in mm -> mm


def _corners_up_out(n: np.ndarray, e: np.ndarray) -> float:
    """The smaller of the two mouth corners' motion, counting only its upward and outward parts."""
    d = e - n
    right = np.hypot(max(-d[48, 0], 0.0), max(d[48, 1], 0.0))  # landmark 48: the subject's right (-X)
    left = np.hypot(max(d[54, 0], 0.0), max(d[54, 1], 0.0))
    return float(min(right, left))


def _lip_gap(n: np.ndarray, e: np.ndarray) -> float:
    return float(np.linalg.norm(e[62] - e[66]) - np.linalg.norm(n[62] - n[66]))


def _brows_up(n: np.ndarray, e: np.ndarray) -> float:
    return float((e[list(_BROWS), 1] - n[list(_BROWS), 1]).mean())


def _lids_close(n: np.ndarray, e: np.ndarray) -> float:
    gap = lambda x: np.mean([np.linalg.norm(x[a] - x[b]) for a, b in _LIDS])  # noqa: E731
    return float(gap(n) - gap(e))


def _chin_side(sign: float) -> Callable[[np.ndarray, np.ndarray], float]:
    return lambda n, e: float(sign * (e[8, 0] - n[8, 0]))


EFFECTS: dict[str, Effect] = {
    "smile": Effect("mouth corners up and out (the lesser corner)", 8.0, _corners_up_out),
    "mouth_open": Effect("inner lips apart (landmarks 62-66)", 15.0, _lip_gap),
    "mouth_stretch": Effect("inner lips apart (landmarks 62-66)", 15.0, _lip_gap),
    "brow_raiser": Effect("brows up (mean of landmarks 17-26)", 5.0, _brows_up),
    "eyes_closed": Effect("eyelid gap closed (mean of 4 lid pairs)", 5.0, _lids_close),
    "jaw_left": Effect("chin toward the subject's left (+X)", 5.0, _chin_side(+1.0)),
    "jaw_right": Effect("chin toward the subject's right (-X)", 5.0, _chin_side(-1.0)),
}


def landmark_points(vertices: np.ndarray, landmark_vertices: np.ndarray) -> np.ndarray:
    """``[68, 3]`` in millimetres from mesh ``vertices`` in metres (NaN where a landmark was cut), relative to
    the nose bridge."""
    idx = np.asarray(landmark_vertices)
    pts = np.where((idx >= 0)[:, None], np.asarray(vertices, dtype=np.float64)[np.maximum(idx, 0)], np.nan) * 1000
    return pts - np.nanmean(pts[list(_BRIDGE)], axis=0)


def expression_effect(name: str, neutral_m: np.ndarray, expression_m: np.ndarray,
                      landmark_vertices: np.ndarray) -> tuple[Effect, float]:
    """The stated effect of expression ``name`` and its size in mm, from two exported meshes' vertices (metres,
    same topology)."""
    effect = EFFECTS[name]
    return effect, effect.measure(landmark_points(neutral_m, landmark_vertices),
                                  landmark_points(expression_m, landmark_vertices))
