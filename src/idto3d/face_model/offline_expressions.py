"""Named expressions from the morphable model's unnamed expression components (the offline expressions).

The 3DDFA expression basis has 10 components without names. Each named expression here is defined by a goal
on the 68 landmarks of the mean face, as displacements in units of the face height (nasion, landmark 27, to chin,
landmark 8): e.g. ``mouth_open`` moves the lower lip and chin down while the upper lip and the upper face
stay. Its coefficients solve a small ridge-regularised weighted least squares over the landmark goals; since
the basis is linear and shared by every shape, the same coefficients apply to any fitted shape. Names are the
prior vocabulary's (``idto3d.core.expressions``), so an offline run's expressions line up with the priors'.
Only expressions the basis can show are defined (it cannot close the eyes: the best fit narrows them by < 1 mm).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from idto3d.core.errors import IdtoError
from idto3d.face_model.morphable_model import MorphableModel
from idto3d.core.expressions import get_expression

UPPER_FACE = tuple(range(17, 48))  # brows, nose, eyes
JAW = tuple(range(0, 17))
UPPER_LIP = (49, 50, 51, 52, 53, 61, 62, 63)
LOWER_LIP = (55, 56, 57, 58, 59, 65, 66, 67)
CORNERS = (48, 54, 60, 64)
CHIN = (5, 6, 7, 8, 9, 10, 11)
_UPPER_LIDS = (37, 38, 43, 44)
_LOWER_LIDS = (41, 40, 47, 46)  # below each upper-lid landmark, in the same order
# Ridge weight on the coefficients (prior-std units) against the goal residuals (face-height units).
_RIDGE = 1e-3


@dataclass(frozen=True)
class Goal:
    """Target displacement ``[68, 3]`` and weight ``[68]`` of each landmark (weight 0 = free)."""

    displacement: np.ndarray
    weight: np.ndarray


def _still_face() -> tuple[np.ndarray, np.ndarray]:
    """Everything stays (weight 1), the mouth region is free unless a goal sets it."""
    d = np.zeros((68, 3))
    w = np.ones(68)
    w[48:68] = 0.0
    return d, w


def _jaw_drop(amount: float) -> Goal:
    # AU26 (jaw drop) with AU25 (lips part): lower lip and chin down, corners half-way, upper lip stays.
    d, w = _still_face()
    d[list(LOWER_LIP + CHIN), 1] = -amount
    d[list(CORNERS), 1] = -amount / 2
    w[list(UPPER_LIP + LOWER_LIP + CORNERS + CHIN)] = 3.0
    return Goal(d, w)


def _smile() -> Goal:
    # AU12 (lip corner puller): corners up and outward; AU6 raises the cheeks, which the landmarks do not see.
    # The lips stay closed: the middle of both inner lips and the chin stay where they are.
    d, w = _still_face()
    for i in (48, 60):
        d[i] = [-0.05, 0.08, 0.0]
    for i in (54, 64):
        d[i] = [0.05, 0.08, 0.0]
    w[[48, 54]] = 5.0
    w[[60, 64]] = 2.0
    w[[61, 62, 63, 65, 66, 67]] = 2.0
    return Goal(d, w)


def _brow_raise() -> Goal:
    # AU1 + AU2: inner and outer brows up; the eyes' corners, nose and mouth stay; the upper lids may follow.
    d, w = _still_face()
    d[17:27, 1] = 0.09
    w[list(_UPPER_LIDS)] = 0.0
    return Goal(d, w)


def _eyes_close() -> Goal:
    # AU43: each upper lid comes down onto the lower lid (filled in per model by goal_for); brows stay.
    d, w = _still_face()
    w[list(_UPPER_LIDS)] = 3.0
    return Goal(d, w)


def _jaw_side(direction: float) -> Goal:
    # AU30: the jaw (chin, lower lip) shifts sideways; +1 = toward the subject's left = image right = +X.
    d, w = _still_face()
    moved = tuple(range(4, 13)) + LOWER_LIP
    d[list(moved), 0] = 0.08 * direction
    w[list(moved)] = 3.0
    return Goal(d, w)


# name -> goal in face-height units (mouth_open: a ~2 cm lip gap on an average face; mouth_stretch: ~4 cm)
_GOALS: dict[str, Callable[[], Goal]] = {
    "smile": _smile,
    "mouth_open": lambda: _jaw_drop(0.18),
    "mouth_stretch": lambda: _jaw_drop(0.30),
    "brow_raiser": _brow_raise,
    "eyes_closed": _eyes_close,
    "jaw_left": lambda: _jaw_side(+1.0),
    "jaw_right": lambda: _jaw_side(-1.0),
}
OFFLINE_EXPRESSIONS: tuple[str, ...] = ("neutral", *_GOALS)
# What `idto3d generate` makes without priors when no expressions are asked for: the basic set, which
# keeps the offline run within minutes on a CPU (every expression adds a template target and an export).
DEFAULT_OFFLINE_EXPRESSIONS: tuple[str, ...] = ("neutral", "smile", "mouth_open")


def face_height(model: MorphableModel) -> float:
    lm = model.mean[model.landmarks].double()
    return float((lm[27] - lm[8]).norm())


def goal_for(model: MorphableModel, name: str, face: torch.Tensor | None = None) -> Goal:
    """The landmark goal of an offline expression, in the model's working-space units (``face``: the neutral
    face it applies to, whose own lids ``eyes_closed`` closes; default the mean face)."""
    key = get_expression(name).name
    if key not in _GOALS:
        raise IdtoError(f"no offline definition for expression '{name}'; offline expressions (no priors): "
                        f"{', '.join(OFFLINE_EXPRESSIONS)}")
    goal = _GOALS[key]()
    displacement = goal.displacement * face_height(model)
    if key == "eyes_closed":  # the lids meet: each upper-lid landmark goes onto the lower lid below it
        lm = (model.mean if face is None else face)[model.landmarks].double().detach().cpu().numpy()
        displacement[list(_UPPER_LIDS)] = lm[list(_LOWER_LIDS)] - lm[list(_UPPER_LIDS)]
    return Goal(displacement, goal.weight)


def expression_coefficients(model: MorphableModel, name: str) -> torch.Tensor:
    """``[E]`` expression coefficients (prior-std units) of the named expression; zeros for ``neutral``."""
    key = get_expression(name).name
    if key == "neutral":
        return torch.zeros(model.num_expression)
    goal = goal_for(model, key)
    if model.num_expression == 0:
        raise IdtoError(f"face model '{model.name}' has no expression components, so no '{key}' offline")
    h = face_height(model)
    basis = model.expression_basis[model.landmarks].double().numpy()  # [68, 3, E]
    w = np.sqrt(goal.weight)[:, None, None]
    a = (basis * w).reshape(-1, basis.shape[-1]) / h
    b = (goal.displacement * w[..., 0]).reshape(-1) / h
    coeffs = np.linalg.solve(a.T @ a + _RIDGE * np.eye(a.shape[1]), a.T @ b)
    return torch.from_numpy(coeffs).float()


def expression_vertices(model: MorphableModel, shape: torch.Tensor | None, name: str) -> torch.Tensor:
    """``[V, 3]``: the face with ``shape`` coefficients showing the named offline expression.

    The expression components give the natural, whole-face part of the motion (cheeks, lips' shape); what they
    cannot reach of the goal (their 10 components cannot close the eyes or move the corners a full centimetre)
    is added by a landmark-driven warp (:func:`landmark_warp`), so every goal landmark reaches its target."""
    key = get_expression(name).name
    neutral = model.vertices(shape)
    if key == "neutral":
        return neutral
    goal = goal_for(model, key, neutral)
    coeffs = expression_coefficients(model, key) if model.num_expression else torch.zeros(0)
    moved = neutral + _apply_basis(model.expression_basis, coeffs)
    reached = (moved - neutral)[model.landmarks].double().numpy()
    pinned = goal.weight > 0
    residual = np.where(pinned[:, None], goal.displacement - reached, 0.0)
    warp = landmark_warp(model, neutral, np.nonzero(pinned)[0], residual[pinned])
    return moved + warp


def _apply_basis(basis: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    return basis @ coeffs.to(basis) if coeffs.numel() else torch.zeros(basis.shape[:2])


def _border_anchors(model: MorphableModel, count: int = 256) -> np.ndarray:
    """Up to ``count`` vertices spread along the face mesh's border (they stay put under the warp)."""
    import igl

    loop = np.asarray(igl.boundary_loop(model.faces.numpy().astype(np.int64)))
    return loop[np.linspace(0, loop.size, min(count, loop.size), endpoint=False).astype(np.int64)]


def landmark_warp(model: MorphableModel, vertices: torch.Tensor, landmarks: np.ndarray, displacement: np.ndarray
                  ) -> torch.Tensor:
    """``[V, 3]`` smooth displacements of the face ``vertices`` that move landmarks ``landmarks`` (indices into
    the 68) by ``displacement [K, 3]`` and keep the face's border still: a 3-D thin-plate-spline interpolation
    (``scipy.interpolate.RBFInterpolator``; the FACS action unit as target displacements, propagated smoothly)."""
    from scipy.interpolate import RBFInterpolator

    v = vertices.detach().double().cpu().numpy()
    anchors = _border_anchors(model)
    centres = np.concatenate([v[model.landmarks.numpy()[landmarks]], v[anchors]])
    values = np.concatenate([displacement, np.zeros((anchors.size, 3))])
    rbf = RBFInterpolator(centres, values, kernel="thin_plate_spline")
    return torch.from_numpy(rbf(v)).to(vertices.dtype)
