"""Fit the morphable model to the 68 landmarks of one or more photos of the same person.

One shape is shared by all photos; each photo has its own pose (rotation, scale, 2-D translation of a
weak-perspective camera) and expression. The energy is a MAP estimate:

    sum_photos sum_landmarks  w_l * c^2 * rho(|r_l|^2 / (c sigma)^2)  +  a |shape|^2  +  b sum_photos |expr|^2

with ``r_l`` the reprojection residual in pixels, ``sigma`` the landmark noise (``landmark_sigma`` times the
landmarks' rms spread, so the fit does not depend on the photo's resolution), ``rho`` soft-L1
(``2(sqrt(1+z)-1)``: quadratic near 0, linear beyond ``c = robust_scale`` sigmas, so one bad landmark cannot
drag the fit) and N(0, 1) priors on the coefficients (the basis is scaled to prior-std units).

The 17 jawline landmarks are down-weighted (``jaw_weight``), not matched: dlib puts them on the visible
silhouette of the cheek, which slides over the face as the head turns, while the model's landmarks are fixed
vertices. Each photo starts from a closed-form affine camera fitted to the other 51 landmarks against the mean
face (its nearest rotation and mean scale), then L-BFGS (float64) refines everything jointly. There is no random
component: the fit is deterministic; ``seed`` is accepted for a uniform stage API.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from idto3d.core.config import FaceModelConfig
from idto3d.core.errors import IdtoError
from idto3d.face_model.morphable_model import N_LANDMARKS, MorphableModel
from idto3d.render.camera import Camera

JAW = tuple(range(0, 17))
INNER = tuple(range(17, 68))
# Distance of the photo camera (working-space units): far enough that the perspective camera of
# ``weak_perspective_camera`` differs from the weak-perspective fit by < 0.3% of a point's offset from the face
# centre (the face is ~0.5 units deep), close enough for a well-conditioned depth range.
CAMERA_DISTANCE = 100.0
_DEPTH_MARGIN = 20.0


@dataclass
class PhotoFit:
    rotation: torch.Tensor     # [3, 3] model -> camera (camera looks down -Z, +Y up)
    scale: float               # pixels per working-space unit
    translation: torch.Tensor  # [2] pixels: where the model origin lands (x right, y down, pixel-centre coords)
    expression: torch.Tensor   # [E]
    landmarks: np.ndarray      # [68, 2] the landmarks fitted to
    rms_px: float              # landmark reprojection rms (all 68) after the fit
    image_size: tuple[int, int]  # (H, W)

    def project(self, points: torch.Tensor) -> torch.Tensor:
        """Model-space points ``[N, 3]`` to pixel coordinates ``[N, 2]`` (x right, y down)."""
        cam = points.to(self.rotation) @ self.rotation.T
        return torch.stack([self.scale * cam[:, 0] + self.translation[0],
                            -self.scale * cam[:, 1] + self.translation[1]], dim=1)


@dataclass
class FaceFit:
    model_name: str
    shape: torch.Tensor        # [K] shared by all photos
    photos: list[PhotoFit]

    def neutral_vertices(self, model: MorphableModel) -> torch.Tensor:
        """``[V, 3]``: the fitted shape with no expression."""
        return model.vertices(self.shape.to(model.mean), None)


def _rodrigues(w: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[P, 3, 3]`` from axis-angle vectors ``[P, 3]`` (smooth at 0)."""
    theta2 = (w * w).sum(-1, keepdim=True)
    small = theta2 < 1e-12
    # Evaluate the exact formulas at a safe angle where the series is used, so no branch's gradient is NaN.
    t2 = torch.where(small, torch.ones_like(theta2), theta2)
    theta = torch.sqrt(t2)
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)[..., None]
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / t2)[..., None]
    zero = torch.zeros_like(w[:, 0])
    k = torch.stack([torch.stack([zero, -w[:, 2], w[:, 1]], -1),
                     torch.stack([w[:, 2], zero, -w[:, 0]], -1),
                     torch.stack([-w[:, 1], w[:, 0], zero], -1)], -2)
    eye = torch.eye(3, dtype=w.dtype).expand_as(k)
    return eye + a * k + b * (k @ k)


def _initial_pose(points2d: np.ndarray, model_points: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Closed-form weak-perspective pose ``(R [3,3], s, t [2])`` from 2-D landmarks (image coords) to 3-D ones.

    Least-squares affine camera on y-up coordinates, then the nearest matrix with orthonormal rows (SVD), the
    mean singular value as the scale and the third row as the cross product of the first two.
    """
    q = points2d.astype(np.float64) * np.array([1.0, -1.0])
    x = model_points.astype(np.float64)
    qm, xm = q.mean(0), x.mean(0)
    a = np.linalg.lstsq(x - xm, q - qm, rcond=None)[0].T  # [2, 3]
    u, sv, vt = np.linalg.svd(a, full_matrices=False)
    r2 = u @ vt
    rot = np.vstack([r2, np.cross(r2[0], r2[1])])
    s = float(sv.mean())
    t = qm - s * (rot[:2] @ xm)
    return rot, s, np.array([t[0], -t[1]])


def _check_inputs(model: MorphableModel, landmarks: Sequence[np.ndarray],
                  image_sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    if len(landmarks) == 0:
        raise IdtoError("the face fit needs landmarks of at least one photo")
    if len(image_sizes) != len(landmarks):
        raise IdtoError(f"got {len(landmarks)} landmark sets but {len(image_sizes)} image sizes")
    for i, size in enumerate(image_sizes):
        if len(size) != 2 or min(int(size[0]), int(size[1])) < 1:
            raise IdtoError(f"photo {i}: image size must be (H, W) in pixels, got {size!r}")
    if model.landmarks.shape != (N_LANDMARKS,):
        raise IdtoError(f"the face model must have {N_LANDMARKS} landmarks, it has {tuple(model.landmarks.shape)}")
    out = []
    for i, lm in enumerate(landmarks):
        a = np.asarray(lm, dtype=np.float64)
        if a.shape != (N_LANDMARKS, 2) or not np.isfinite(a).all():
            raise IdtoError(f"photo {i}: landmarks must be finite [68, 2], got shape {a.shape}")
        if np.sqrt(((a - a.mean(0)) ** 2).sum(1).mean()) < 1.0:
            raise IdtoError(f"photo {i}: the landmarks are all at one point")
        out.append(a)
    return out


@dataclass
class _Targets:
    """What the fit matches, in float64 on the host: the model's landmark rows and the photos' landmarks."""

    mean: torch.Tensor               # [68, 3]
    shape_basis: torch.Tensor        # [68, 3, K]
    expression_basis: torch.Tensor   # [68, 3, E]
    points: torch.Tensor             # [P, 68, 2] the photos' landmarks, pixels
    spread: torch.Tensor             # [P] their rms spread, pixels
    sigma: torch.Tensor              # [P, 1] landmark noise, pixels
    weight: torch.Tensor             # [68] per-landmark weight (jawline down-weighted)


@dataclass
class _Unknowns:
    """The fit's parameters: one shape, and per photo a pose and an expression."""

    rot0: torch.Tensor       # [P, 3, 3] the closed-form rotations the axis-angle updates start from (fixed)
    omega: torch.Tensor      # [P, 3] axis-angle update of rot0
    log_s: torch.Tensor      # [P] log scale, pixels per unit
    trans_hat: torch.Tensor  # [P, 2] translation in units of the landmark spread
    beta: torch.Tensor       # [K] shape
    psi: torch.Tensor        # [P, E] expressions

    def parameters(self) -> list[torch.Tensor]:
        return [self.omega, self.log_s, self.trans_hat, self.beta, self.psi]


def _targets(model: MorphableModel, lms: list[np.ndarray], cfg: FaceModelConfig) -> _Targets:
    dt = torch.float64
    idx = model.landmarks.cpu()
    points = torch.tensor(np.stack(lms), dtype=dt)
    spread = torch.sqrt(((points - points.mean(1, keepdim=True)) ** 2).sum(-1).mean(-1))
    weight = torch.ones(N_LANDMARKS, dtype=dt)
    weight[list(JAW)] = cfg.jaw_weight
    return _Targets(mean=model.mean[idx].to("cpu", dt), shape_basis=model.shape_basis[idx].to("cpu", dt),
                    expression_basis=model.expression_basis[idx].to("cpu", dt), points=points, spread=spread,
                    sigma=(cfg.landmark_sigma * spread)[:, None], weight=weight)


def _initial_unknowns(targets: _Targets, lms: list[np.ndarray]) -> _Unknowns:
    """Each photo's closed-form pose from its inner landmarks against the mean face; zero shape and expressions."""
    dt = torch.float64
    inner = list(INNER)
    poses = [_initial_pose(a[inner], targets.mean.numpy()[inner]) for a in lms]
    n_photos = len(lms)
    # Translation is optimised in units of the landmark spread, so all parameters have similar scales.
    trans_hat = torch.tensor(np.stack([t for _, _, t in poses]), dtype=dt) / targets.spread[:, None]
    return _Unknowns(rot0=torch.tensor(np.stack([r for r, _, _ in poses]), dtype=dt),
                     omega=torch.zeros(n_photos, 3, dtype=dt, requires_grad=True),
                     log_s=torch.tensor([math.log(s) for _, s, _ in poses], dtype=dt).requires_grad_(True),
                     trans_hat=trans_hat.requires_grad_(True),
                     beta=torch.zeros(targets.shape_basis.shape[-1], dtype=dt, requires_grad=True),
                     psi=torch.zeros(n_photos, targets.expression_basis.shape[-1], dtype=dt, requires_grad=True))


def _project(t: _Targets, x: _Unknowns) -> torch.Tensor:
    """The model's landmarks in each photo's pixels ``[P, 68, 2]``."""
    pts = t.mean + t.shape_basis @ x.beta + torch.einsum("lce,pe->plc", t.expression_basis, x.psi)  # [P, 68, 3]
    rot = _rodrigues(x.omega) @ x.rot0                                                              # [P, 3, 3]
    cam = torch.einsum("pij,plj->pli", rot, pts)
    s = x.log_s.exp()[:, None]
    trans = x.trans_hat * t.spread[:, None]
    return torch.stack([s * cam[..., 0] + trans[:, None, 0], -s * cam[..., 1] + trans[:, None, 1]], -1)


def _energy(t: _Targets, x: _Unknowns, cfg: FaceModelConfig) -> torch.Tensor:
    """The MAP energy of the module docstring: robust reprojection error plus the coefficients' priors."""
    c = float(cfg.robust_scale)
    r2 = ((_project(t, x) - t.points) ** 2).sum(-1) / t.sigma ** 2                             # [P, 68]
    data = (t.weight * c * c * 2 * (torch.sqrt(1 + r2 / (c * c)) - 1)).sum()
    return data + cfg.shape_prior_weight * (x.beta ** 2).sum() + cfg.expression_prior_weight * (x.psi ** 2).sum()


def _minimise(energy: Callable[[], torch.Tensor], params: list[torch.Tensor], iterations: int,
              progress: Callable[[int, int], None] | None) -> None:
    """L-BFGS, one iteration per step, until the energy stops changing (relative 1e-8) or ``iterations``."""
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=1, max_eval=25, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-14)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = energy()
        loss.backward()
        return loss

    previous = math.inf
    for step in range(iterations):
        loss = float(opt.step(closure).detach())
        if progress is not None:
            progress(step + 1, iterations)
        if not math.isfinite(loss):
            raise IdtoError("the face fit diverged (non-finite energy); check the photos' landmarks")
        if abs(previous - loss) <= 1e-8 * max(1.0, abs(loss)):
            break
        previous = loss


def _photo_fits(t: _Targets, x: _Unknowns, landmarks: Sequence[np.ndarray],
                image_sizes: Sequence[tuple[int, int]]) -> list[PhotoFit]:
    with torch.no_grad():
        pred = _project(t, x)
        rms = torch.sqrt(((pred - t.points) ** 2).sum(-1).mean(-1))
        rot = _rodrigues(x.omega) @ x.rot0
        scale = x.log_s.exp()
        trans = x.trans_hat * t.spread[:, None]
    return [PhotoFit(rotation=rot[i].float(), scale=float(scale[i]), translation=trans[i].detach().float(),
                     expression=x.psi[i].detach().float(), landmarks=np.asarray(landmarks[i], dtype=np.float32),
                     rms_px=float(rms[i]), image_size=(int(image_sizes[i][0]), int(image_sizes[i][1])))
            for i in range(len(landmarks))]


def fit_photos(model: MorphableModel, landmarks: Sequence[np.ndarray], image_sizes: Sequence[tuple[int, int]],
               cfg: FaceModelConfig | None = None, seed: int = 0,
               progress: Callable[[int, int], None] | None = None) -> FaceFit:
    """Fit one shape and per-photo pose + expression to each photo's ``[68, 2]`` landmarks (see module doc).

    ``image_sizes`` are ``(H, W)``; ``progress(step, total)`` is called after each L-BFGS iteration.
    """
    cfg = cfg or FaceModelConfig()
    lms = _check_inputs(model, landmarks, image_sizes)
    targets = _targets(model, lms, cfg)
    unknowns = _initial_unknowns(targets, lms)
    _minimise(lambda: _energy(targets, unknowns, cfg), unknowns.parameters(), cfg.iterations, progress)
    photos = _photo_fits(targets, unknowns, landmarks, image_sizes)
    return FaceFit(model_name=model.name, shape=unknowns.beta.detach().float(), photos=photos)


def resume_unknowns(model: MorphableModel, fit: FaceFit, cfg: FaceModelConfig | None = None
                    ) -> tuple[_Targets, _Unknowns]:
    """The landmark energy's targets and unknowns at ``fit`` (its rotations as the fixed starts, zero
    axis-angle updates), so a later refinement (``face_model.photometric_fit``) keeps this energy as a term."""
    cfg = cfg or FaceModelConfig()
    lms = _check_inputs(model, [p.landmarks for p in fit.photos], [p.image_size for p in fit.photos])
    targets = _targets(model, lms, cfg)
    dt = torch.float64
    unknowns = _Unknowns(
        rot0=torch.stack([p.rotation.to(dt) for p in fit.photos]),
        omega=torch.zeros(len(lms), 3, dtype=dt, requires_grad=True),
        log_s=torch.tensor([math.log(p.scale) for p in fit.photos], dtype=dt).requires_grad_(True),
        trans_hat=(torch.stack([p.translation.to(dt) for p in fit.photos]) / targets.spread[:, None]
                   ).requires_grad_(True),
        beta=fit.shape.to(dt).clone().requires_grad_(True),
        psi=torch.stack([p.expression.to(dt) for p in fit.photos]).clone().requires_grad_(True))
    return targets, unknowns


def landmark_energy(targets: _Targets, unknowns: _Unknowns, cfg: FaceModelConfig) -> torch.Tensor:
    """The landmark fit's MAP energy (module docstring) at ``unknowns``."""
    return _energy(targets, unknowns, cfg)


def fit_from_unknowns(model: MorphableModel, targets: _Targets, unknowns: _Unknowns,
                      photos: Sequence[PhotoFit]) -> FaceFit:
    """A ``FaceFit`` of ``unknowns`` (the photos' landmarks and sizes taken from ``photos``)."""
    out = _photo_fits(targets, unknowns, [p.landmarks for p in photos], [p.image_size for p in photos])
    return FaceFit(model_name=model.name, shape=unknowns.beta.detach().float(), photos=out)


def minimise(energy: Callable[[], torch.Tensor], params: list[torch.Tensor], iterations: int) -> None:
    """The landmark fit's L-BFGS loop (stops when the energy changes by < 1e-8 relative)."""
    _minimise(energy, params, iterations, None)


def weak_perspective_camera(fit: PhotoFit, distance: float = CAMERA_DISTANCE) -> Camera:
    """A ``Camera`` (batch of 1) whose renders of model space at the photo's ``(H, W)`` line up with the photo.

    A perspective camera ``distance`` units away along the fitted view axis, with a narrow field of view
    matching the fitted scale and the principal point moved to the fitted translation: the perspective
    counterpart of the weak-perspective fit (it differs by ~depth/distance of each point's offset).
    """
    h, w = fit.image_size
    rot = fit.rotation.to(torch.float64)
    s = float(fit.scale)
    tx, ty = (float(v) for v in fit.translation)
    view = torch.eye(4, dtype=torch.float64)
    view[:3, :3] = rot
    view[2, 3] = -distance
    near, far = distance - _DEPTH_MARGIN, distance + _DEPTH_MARGIN
    proj = torch.zeros(4, 4, dtype=torch.float64)
    # Pixel (col, row) has its centre at NDC ((col + 0.5) 2/W - 1, 1 - (row + 0.5) 2/H), as the rasteriser.
    proj[0, 0] = 2.0 * s * distance / w
    proj[1, 1] = 2.0 * s * distance / h
    proj[0, 2] = -(2.0 * (tx + 0.5) / w - 1.0)
    proj[1, 2] = -(1.0 - 2.0 * (ty + 0.5) / h)
    proj[2, 2] = -(far + near) / (far - near)
    proj[2, 3] = -2.0 * far * near / (far - near)
    proj[3, 2] = -1.0
    eye = rot.T @ torch.tensor([0.0, 0.0, distance], dtype=torch.float64)
    elevation = torch.rad2deg(torch.asin((eye[1] / distance).clamp(-1, 1)))
    azimuth = torch.rad2deg(torch.atan2(eye[0], eye[2]))
    fov = torch.rad2deg(2 * torch.atan(torch.tensor(1.0 / proj[1, 1].item(), dtype=torch.float64)))
    f32 = torch.float32
    return Camera(view=view[None].to(f32), proj=proj[None].to(f32), eye=eye[None].to(f32),
                  elevation_deg=elevation.reshape(1).to(f32), azimuth_deg=azimuth.reshape(1).to(f32),
                  radius=torch.tensor([distance], dtype=f32), fov_deg=fov.reshape(1).to(f32))


def camera_pixels(camera: Camera, points: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Pixel coordinates ``[N, 2]`` (x right, y down, pixel-centre convention) of world points seen by a
    one-camera ``camera`` rendering ``(H, W)`` images."""
    h, w = image_size
    clip = camera.project(points.to(camera.view.dtype))[0]
    ndc = clip[:, :2] / clip[:, 3:4]
    return torch.stack([(ndc[:, 0] + 1) * (0.5 * w) - 0.5, (1 - ndc[:, 1]) * (0.5 * h) - 0.5], dim=1)
