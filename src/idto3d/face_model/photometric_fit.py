"""Photometric refinement of the landmark fit: the shaded face should look like the photo (shape from shading).

68 landmarks fix a face's outline, not its mid-scale relief (cheekbones, the nose's bridge, the brows' ridge):
the landmark fit leaves the 40 shape coefficients to its prior wherever landmarks say nothing. Like the 3DMM
fitters that follow it (Blanz & Vetter 1999, Face2Face, DECA), the fit is refined so that the face, rendered by
our rasteriser and shaded by a 2nd-order spherical-harmonic light, matches each photo's pixels inside the plain
skin (the face between jaw and brows, minus brows, eyes and mouth), while the landmark energy and the
coefficients' priors stay as terms (``face_model.landmark_fit``):

    E = E_landmarks(shape, poses, expressions)  +  w * 68 * mean_pixels( c^2 rho(|I - Y(n) L|^2 / (c sigma)^2) )

``I`` is the photo in linear RGB, ``n`` the rendered camera-space normal, ``Y`` the 9 SH basis functions and
``L`` ``[9, 3]`` the light times a constant skin albedo, solved in closed form for the current normals at every
evaluation (ridge least squares weighted by the robust term's weights at the round's start, IRLS), so it is not an
unknown of its own (variable projection). Skin albedo is taken as constant: the features whose
albedo differs (brows, eyes, lips) are masked out and what remains (nostrils, stubble, make-up) is down-weighted by
the robust ``rho`` (soft-L1, as the landmark term; ``sigma`` = 0.02 in linear RGB). ``w`` (``photometric_weight``)
counts the pixels as that many landmarks' worth of evidence, whatever the resolution.

Visibility and each pixel's triangle are found by rasterising (``render.rasterize``, orthographic, the fit's
weak-perspective camera) at the start of each round and held within it (the rounds refresh them); within a round
L-BFGS moves the normals through the vertices, which is what shading constrains. Work is on a square crop of the
face, ``photometric_resolution`` pixels a side, and each step evaluates only the triangles around the pixels
(a quarter of the mesh or less). Deterministic (no random component); about 3.5 s on a CPU core at the defaults
for one photo.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from skimage.draw import polygon2mask

from idto3d.core.config import FaceModelConfig
from idto3d.core.errors import IdtoError
from idto3d.face_model.landmark_fit import (
    FaceFit,
    _rodrigues,
    _Targets,
    _Unknowns,
    fit_from_unknowns,
    landmark_energy,
    minimise,
    resume_unknowns,
)
from idto3d.face_model.morphable_model import N_LANDMARKS, MorphableModel
from idto3d.render.envmap import srgb_to_linear
from idto3d.render.pbr import sh9_basis
from idto3d.render.rasterize_torch import rasterize

PHOTO_SIGMA = 0.02       # pixel noise, linear RGB
_ROBUST = 3.0            # residuals beyond this many sigmas count linearly
_CROP_MARGIN = 0.35      # the crop reaches this fraction of the landmarks' extent beyond them
_LIGHT_RIDGE = 1e-4      # on the directional SH terms, relative to the normal equations' scale
_MIN_FACING = 0.3        # pixels whose normal is more grazing than this (n_z) are left out: silhouettes
_FACE_OUTLINE = list(range(17)) + list(range(26, 16, -1))  # jaw, then the brows right to left
_FEATURES = (range(17, 22), range(22, 27), range(36, 42), range(42, 48), range(48, 60))  # brows, eyes, mouth


@dataclass
class _Crop:
    """One photo's square face crop and its pixel mapping ``crop = (full + 0.5) * zoom - offset``."""

    linear: torch.Tensor   # [R, R, 3] float64 linear RGB
    skin: torch.Tensor     # [R, R] bool: plain skin by the photo's landmarks
    offset: torch.Tensor   # [2] float64
    zoom: float
    size: int


@dataclass
class PhotometricReport:
    """How the refinement went, per photo: the median absolute residual (linear RGB) of the skin pixels the last
    round saw, at the landmark fit and refined (each with its best light): the typical pixel, not the few
    the constant-albedo model cannot explain."""

    residual_before: list[float]
    residual_after: list[float]
    pixels: list[int]


def _crop(image: np.ndarray, landmarks: np.ndarray, size: int) -> _Crop:
    lm = np.asarray(landmarks, dtype=np.float64)
    lo, hi = lm.min(0), lm.max(0)
    side = int(np.ceil((hi - lo).max() * (1 + 2 * _CROP_MARGIN)))
    x0, y0 = (np.round((lo + hi) / 2 - side / 2)).astype(int)
    pad = side
    padded = cv2.copyMakeBorder(np.ascontiguousarray(image), pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    window = padded[y0 + pad:y0 + pad + side, x0 + pad:x0 + pad + side]
    small = cv2.resize(window, (size, size), interpolation=cv2.INTER_AREA)
    zoom = size / side
    offset = np.array([x0, y0], dtype=np.float64) * zoom + 0.5
    # crop pixel (centre convention) of full pixel p: (p + 0.5) * zoom - 0.5 - x0 * zoom
    lm_crop = (lm + 0.5) * zoom - offset
    linear = srgb_to_linear(torch.from_numpy(small).double() / 255.0)
    return _Crop(linear=linear, skin=torch.from_numpy(_skin_mask(lm_crop, size)), offset=torch.from_numpy(offset),
                 zoom=zoom, size=size)


def _skin_mask(lm: np.ndarray, size: int) -> np.ndarray:
    """``[R, R]`` bool: inside the jaw-and-brows outline (pulled 8 % toward its centre) minus the brows, eyes and
    mouth (each feature's landmark polygon with every point moved 4 % of the face's size away from the feature's
    centre along each axis, so the thin brow polygons become bands)."""
    outline = lm[_FACE_OUTLINE]
    centre = outline.mean(0)
    inside = polygon2mask((size, size), ((outline - centre) * 0.92 + centre)[:, ::-1])
    grow = 0.04 * float(np.linalg.norm(lm.max(0) - lm.min(0)))
    features = np.zeros((size, size), dtype=bool)
    for part in _FEATURES:
        pts = lm[list(part)]
        features |= polygon2mask((size, size), (pts + np.sign(pts - pts.mean(0)) * grow)[:, ::-1])
    return inside & ~features


def _pixels(t: _Targets, x: _Unknowns, model_vertices: torch.Tensor, i: int, crop: _Crop) -> torch.Tensor:
    """Photo ``i``'s crop pixel coordinates and camera depth ``[V, 3]`` of model-space vertices (the landmark
    fit's weak-perspective camera, ``landmark_fit._project``, for every vertex)."""
    rot = (_rodrigues(x.omega[i:i + 1]) @ x.rot0[i:i + 1])[0]
    cam = model_vertices @ rot.T
    s = x.log_s[i].exp()
    trans = x.trans_hat[i] * t.spread[i]
    px = (s * cam[:, 0] + trans[0] + 0.5) * crop.zoom - crop.offset[0]
    py = (-s * cam[:, 1] + trans[1] + 0.5) * crop.zoom - crop.offset[1]
    return torch.stack([px, py, cam[:, 2]], 1)


def _clip(pix: torch.Tensor, size: int) -> torch.Tensor:
    """Orthographic clip coordinates ``[V, 4]`` of crop pixels + depth (nearer = larger camera z)."""
    z = pix[:, 2]
    span = (z.max() - z.min()).clamp(min=1e-6)
    ndc_z = 0.9 - 1.8 * (z - z.min()) / span  # in (-1, 1); the nearest point has the smallest depth
    return torch.stack([(pix[:, 0] + 0.5) * (2.0 / size) - 1.0, 1.0 - (pix[:, 1] + 0.5) * (2.0 / size),
                        ndc_z, torch.ones_like(z)], 1)


def _vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    v0, v1, v2 = (vertices[faces[:, k]] for k in range(3))
    fn = torch.cross(v1 - v0, v2 - v0, dim=-1)
    vn = torch.zeros_like(vertices)
    for k in range(3):
        vn = vn.index_add(0, faces[:, k], fn)
    return torch.nn.functional.normalize(vn, dim=-1, eps=1e-20)


@dataclass
class _Basis:
    """The model in float64, the precision of the fit, converted once."""

    mean: torch.Tensor
    shape: torch.Tensor
    expression: torch.Tensor
    faces: torch.Tensor

    @classmethod
    def of(cls, model: MorphableModel) -> _Basis:
        return cls(model.mean.double(), model.shape_basis.double(), model.expression_basis.double(), model.faces)

    def subset(self, ids: torch.Tensor) -> _Basis:
        return _Basis(self.mean[ids], self.shape[ids], self.expression[ids], self.faces)


@dataclass
class _Visible:
    """The skin pixels one rasterisation found on the face: their triangle corners and barycentrics, and
    robust weights from the residuals there (held for a round)."""

    basis: _Basis          # the model's rows of the vertices the pixels' normals depend on (the pixels'
                           # triangles' 1-ring: a quarter of the mesh or less, so each step is cheap)
    faces: torch.Tensor    # [F', 3] the triangles around those pixels' corners, indices into basis rows
    corners: torch.Tensor  # [P, 3] each pixel's triangle, indices into basis rows
    bary: torch.Tensor     # [P, 3]
    colour: torch.Tensor   # [P, 3] linear photo colour
    weight: torch.Tensor   # [P] the light fit's robust weights


def _face_vertices(model: _Basis, x: _Unknowns, i: int) -> torch.Tensor:
    """Photo ``i``'s face vertices in model space."""
    return model.mean + model.shape @ x.beta + model.expression @ x.psi[i]


def _local(faces: torch.Tensor, corners: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sub-mesh whose vertex normals at ``corners`` equal the whole mesh's: every triangle touching a
    corner vertex. Returns its vertex ids, its faces and ``corners`` in its local indices."""
    used = torch.zeros(int(faces.max()) + 1, dtype=torch.bool)
    used[corners.reshape(-1)] = True
    ring = faces[used[faces].any(1)]
    ids, local = torch.unique(ring, return_inverse=True)
    lookup = torch.full((used.numel(),), -1, dtype=torch.int64)
    lookup[ids] = torch.arange(ids.numel())
    return ids, local.reshape(-1, 3), lookup[corners]


def _visible(model: _Basis, t: _Targets, x: _Unknowns, i: int, crop: _Crop) -> _Visible:
    faces = model.faces
    with torch.no_grad():
        verts = _face_vertices(model, x, i)
        pix = _pixels(t, x, verts, i, crop)
        frags = rasterize(_clip(pix, crop.size).float(), faces, crop.size)
        tid = frags.triangle_id[0]
        keep = (tid >= 0) & crop.skin
        corners = faces[tid[keep]]
        bary = frags.bary[0][keep].double()
        every = torch.arange(verts.shape[0])
        sel = _Visible(basis=model, faces=faces, corners=corners, bary=bary, colour=crop.linear[keep],
                       weight=torch.ones(int(keep.sum()), dtype=torch.float64))
        facing = _pixel_normals(model, x, i, verts, sel)[:, 2] > _MIN_FACING
        if not bool(facing.any()):
            return _Visible(basis=model.subset(every[:0]), faces=faces[:0], corners=corners[:0], bary=bary[:0],
                            colour=sel.colour[:0], weight=sel.weight[:0])
        ids, local_faces, local_corners = _local(faces, corners[facing])
        sel = _Visible(basis=model.subset(ids), faces=local_faces, corners=local_corners, bary=bary[facing],
                       colour=sel.colour[facing], weight=sel.weight[facing])
        # The light is fitted with the robust term's weights at the round's start (IRLS), so pixels the
        # constant-albedo model cannot explain (nostrils, stubble) do not tilt it.
        r2 = (_residual(model, x, i, sel) ** 2).sum(-1) / PHOTO_SIGMA ** 2
        sel.weight = 1.0 / torch.sqrt(1 + r2 / _ROBUST ** 2)
    return sel


def _pixel_normals(model: _Basis, x: _Unknowns, i: int, verts: torch.Tensor, vis: _Visible
                   ) -> torch.Tensor:
    """Camera-space unit normals ``[P, 3]`` (+z toward the camera) at the visible pixels."""
    rot = (_rodrigues(x.omega[i:i + 1]) @ x.rot0[i:i + 1])[0]
    vn = _vertex_normals(verts, vis.faces) @ rot.T
    n = (vis.bary[..., None] * vn[vis.corners]).sum(1)
    return torch.nn.functional.normalize(n, dim=-1, eps=1e-12)


def solve_light(y: torch.Tensor, colour: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``[9, 3]``: the weighted ridge least-squares SH light (times albedo) with ``y @ L ~= colour``."""
    a = (y * weight[:, None]).T @ y
    ridge = torch.full((9,), _LIGHT_RIDGE, dtype=y.dtype)
    ridge[0] = 0.0
    reg = torch.diag(ridge * a.diagonal().mean().detach())
    return torch.linalg.solve(a + reg, (y * weight[:, None]).T @ colour)


def _residual(model: _Basis, x: _Unknowns, i: int, vis: _Visible) -> torch.Tensor:
    """``[P, 3]``: photo minus the SH-shaded face at the visible pixels, with the best light for these normals."""
    normals = _pixel_normals(model, x, i, _face_vertices(vis.basis, x, i), vis)
    y = sh9_basis(normals)
    light = solve_light(y, vis.colour, vis.weight)
    return vis.colour - y @ light


def _robust(r2: torch.Tensor) -> torch.Tensor:
    c2 = _ROBUST * _ROBUST
    return c2 * 2 * (torch.sqrt(1 + r2 / c2) - 1)


def photometric_energy(model: _Basis, x: _Unknowns, visible: list[_Visible], weight: float
                       ) -> torch.Tensor:
    """``w * 68 * mean(rho)`` over every photo's visible skin pixels (module docstring)."""
    total = torch.zeros((), dtype=torch.float64)
    for i, vis in enumerate(visible):
        if vis.corners.shape[0] == 0:
            continue
        r2 = (_residual(model, x, i, vis) ** 2).sum(-1) / PHOTO_SIGMA ** 2
        total = total + _robust(r2).mean()
    return weight * N_LANDMARKS * total / max(len(visible), 1)


def _median_residual(model: _Basis, x: _Unknowns, visible: list[_Visible]) -> list[float]:
    with torch.no_grad():
        return [float(_residual(model, x, i, v).abs().median()) if v.corners.shape[0] else float("nan")
                for i, v in enumerate(visible)]


def refine_fit(model: MorphableModel, fit: FaceFit, images: list[np.ndarray], cfg: FaceModelConfig | None = None
               ) -> tuple[FaceFit, PhotometricReport]:
    """``fit`` refined so the shaded face matches ``images`` (RGB uint8, the photos fitted, in order) inside
    the skin, the landmark energy and priors kept (module docstring)."""
    cfg = cfg or FaceModelConfig()
    if len(images) != len(fit.photos):
        raise IdtoError(f"the photometric refinement got {len(images)} photos for a fit of {len(fit.photos)}")
    for img, p in zip(images, fit.photos):
        a = np.asarray(img)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or a.shape[:2] != tuple(p.image_size):
            raise IdtoError(f"each photo must be the uint8 RGB image its fit was made on ({p.image_size}), "
                            f"got {a.dtype} {a.shape}")
    targets, x = resume_unknowns(model, fit, cfg)
    _, start = resume_unknowns(model, fit, cfg)
    basis = _Basis.of(model)
    crops = [_crop(img, p.landmarks, cfg.photometric_resolution) for img, p in zip(images, fit.photos)]
    visible: list[_Visible] = []
    for _ in range(cfg.photometric_rounds):
        visible = [_visible(basis, targets, x, i, c) for i, c in enumerate(crops)]

        def energy(visible: list[_Visible] = visible) -> torch.Tensor:
            return (landmark_energy(targets, x, cfg)
                    + photometric_energy(basis, x, visible, cfg.photometric_weight))

        minimise(energy, x.parameters(), cfg.photometric_iterations)
    report = PhotometricReport(residual_before=_median_residual(basis, start, visible),
                               residual_after=_median_residual(basis, x, visible),
                               pixels=[int(v.corners.shape[0]) for v in visible])
    return fit_from_unknowns(model, targets, x, fit.photos), report
