"""The offline texture: the texture field fitted to the subject's photos (issue 7, "photo texture").

Without diffusion priors the head still gets the subject's colours: each photo comes with a fitted
``Camera`` that renders working space onto the photo's pixels and with its 68 dlib landmarks, and the
texture field's albedo is optimised so that its flat (unlit) render matches the photos on the face.

Method
------
* **Working renders.** Each photo is downscaled (antialiased, never upscaled) so its long side is at most
  ``cfg.resolution``; the camera is resolution-independent (NDC), so the render at the small size still
  lines up, and the landmarks are rescaled with it (a landmark ``(x, y)`` is the centre of pixel column
  ``x``, row ``y``, dlib's convention). The geometry is fixed during the fit, so every photo is
  rasterised once (our renderer: z-buffer, perspective-correct UVs per pixel) and each step samples the
  field's albedo texture at those UVs: ``render_albedo``'s colour path (bilinear ``sample_texture``),
  minus silhouette antialiasing (silhouettes never count, see below). The bilinear lookups are kept as
  taps into the covered texels (:func:`bilinear_taps`, the same numbers as sampling the baked texture),
  so a step evaluates the field only at the texels the photos look at, not the whole atlas.
* **Face region.** The convex hull of the landmarks plus the brow landmarks shifted up by
  ``cfg.forehead`` times the brow-to-chin height (landmarks stop at the brows; this covers the
  forehead), eroded by ``cfg.erode`` times the face height and feathered over as much again, so pixels
  weigh 0 at the hull border, rising smoothly to 1 inside.
* **Photometric loss.** Charbonnier (smooth L1) between the rendered albedo and the photo's sRGB pixels,
  over pixels where the head is rendered and inside the face region, weighted by the region's feather
  and by how squarely the surface faces the camera (smoothstep of the cosine between the normal and
  the view direction, 0 below ``cfg.min_cos``, 1 above ``cfg.full_cos``), averaged per photo, then
  over photos (each photo counts equally). All photos are used at every step (1-5 small renders, cheap).
  The photo's shading is baked in: the result is a *pseudo-albedo*. With priors given, the SDS texture
  stage refines it afterwards.
* **Visibility** (:func:`photo_weights`). A texel is seen by a photo when its surface point projects
  onto a rendered pixel whose depth (view-space, interpolated by the rasteriser) is within a tolerance
  of the point's own (1 % of the head's extent plus two pixel footprints, so a texel is not occluded by
  its own triangle's neighbours at a slant) and inside the face region; its weight is the region
  feather times the same cosine smoothstep. Over several photos a texel keeps its best weight.
  ``seen_fraction`` is the share of covered texels whose weight is >= 0.5.
* **Unseen regions** (back of the head, neck, hair area). The mean skin tone is the per-channel median
  of the photos' face-region pixels (brows, eyes and mouth cut out, the feathered border left out). Texels
  not seen well are pulled (squared loss, weight ``cfg.skin_weight * (1 - w / 0.5)``, 0 for well-seen
  ones) toward a fill colour: the Gaussian-weighted mean of the nearest well-seen texels' current
  colours (detached), blended into the skin tone by a smoothstep of the 3-D distance to the nearest
  well-seen texel over ``cfg.falloff`` working-space units. So the face fades into the skin tone with no
  seam at the face border. (A plain pull toward the skin tone, however smooth its weight, would not do
  this: nothing else acts on those texels, so the pull reaches the skin tone wherever its weight is
  non-zero and the face ends in a step.) With priors given, these regions come from the priors instead.
* **Warm start.** Before the first step the albedo head's bias is shifted so the mean albedo is the skin
  tone (a fresh, uniformly grey field becomes uniformly skin-coloured): most texels then start at
  their target, and the steps go to the face.
* **Other channels.** Roughness and metallic are held at skin-like constants (``SKIN_ROUGHNESS`` 0.6,
  a moderately rough dielectric; ``SKIN_METALLIC`` 0) by a squared texel-space loss, since the photos
  say nothing about them and the shared network would otherwise drift them.
* **Optimiser.** Adam on all of the field's parameters (network, expression codes, encoding),
  ``cfg.iterations`` steps, the rate decaying from ``cfg.lr`` to a tenth of it (cosine; at a constant
  rate the colours keep jittering), ``progress(step, loss)`` after each step (step 1..iterations; the
  loss is read from the device every ``log_every`` steps and at the last, and repeats the latest read
  in between).
  Every step uses all photos and the texels they sample, plus ``cfg.fill_texels`` of the unseen
  texels for the fill, drawn from a generator seeded by ``seed`` (the sampled mean is rescaled to the
  mean over all texels). Deterministic under ``seed``; the caller's global RNG state does not matter.

* **Device.** The preparation (rasterising the photos, face regions, visibility, the fill's neighbours,
  all numpy/scipy-backed) runs once on the host; its results move to the field's device once, and the
  fill's texels are drawn on the host from the seeded generator (the same draws on any device), so the
  steps wait for the device only to read the loss every ``log_every`` steps.

Inputs are duck-typed (:class:`PhotoSurface`): the pipeline's ``TexturedExpression`` fits as it is, and
``texture/`` does not import ``pipeline/``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError, cKDTree
from skimage.draw import polygon2mask

from idto3d.core.config import PhotoTextureConfig
from idto3d.core.device import reproducible_kernels
from idto3d.core.errors import IdtoError
from idto3d.render import rasterize_torch
from idto3d.render.albedo import sample_texture
from idto3d.render.backend import Rasterizer, get_rasterizer
from idto3d.render.camera import Camera
from idto3d.render.mesh import Mesh
from idto3d.texture.texture_field import TextureField, texture_optimizer
from idto3d.texture.texels import TexelMap

__all__ = ["N_LANDMARKS", "SEEN_WELL", "SKIN_METALLIC", "SKIN_ROUGHNESS", "PhotoSurface", "PhotoTextureReport",
           "PhotoView", "bilinear_taps", "face_region", "fit_photo_texture", "photo_weights", "texel_normals"]

N_LANDMARKS = 68
SKIN_ROUGHNESS = 0.6
SKIN_METALLIC = 0.0
SEEN_WELL = 0.5          # a texel with at least this weight counts as seen (seen_fraction, fill sources)
_CHARBONNIER_EPS = 1e-3
_DEPTH_TOLERANCE = 0.01  # of the mesh's largest extent
_TAP_REACH = 4.0         # texel spacings: taps farther than this from the pixel's point are another place
_FINAL_LR = 0.1          # the learning rate decays (cosine) to this share of cfg.lr
_EXTEND_NEIGHBOURS = 16  # well-seen texels averaged when carrying the face's colours outward
_EXTEND_WIDTH = 0.25     # of the falloff: the width of that average's Gaussian

# dlib's 68-point layout (iBUG 300-W).
_CHIN = 8
_BROWS = slice(17, 27)
_FEATURES = (slice(17, 22), slice(22, 27), slice(36, 42), slice(42, 48), slice(48, 60))  # brows, eyes, mouth


class PhotoSurface(Protocol):
    """What the fit needs of one expression's textured surface (``pipeline.texture_stage.TexturedExpression``)."""

    mesh: Mesh                      # welded mesh in working space
    uv: torch.Tensor                # [V', 2] per seam-split vertex
    attribute_faces: torch.Tensor   # [F, 3] into uv
    texels: TexelMap                # the texture's covered texels and their surface points


@dataclass
class PhotoView:
    image: np.ndarray          # [H, W, 3] uint8 RGB photo
    camera: Camera             # one view, renders working space onto this photo's pixels
    landmarks: np.ndarray      # [68, 2] dlib order, pixels (x right, y down)


@dataclass
class PhotoTextureReport:
    seen_fraction: float                      # share of covered texels seen well (weight >= 0.5) by a photo
    skin_tone: tuple[float, float, float]     # sRGB median skin colour used for unseen regions
    photometric_rmse: float                   # sRGB [0, 1] units, face-region pixels, after the last step
    seconds: float
    light_sh: list | None = None              # [9][3] the photos' lighting divided out (None: not de-lit)
    hair_tone: tuple[float, float, float] | None = None  # the hair's albedo: its photo median, de-lit (None: none)
    hair_photo_tone: tuple[float, float, float] | None = None  # sRGB median of the segmented hair in the photos
    hair_fraction: float = 0.0                # share of covered texels given the hair colour


# ---------------------------------------------------------------- inputs


def _check_views(views: Sequence[PhotoView]) -> list[PhotoView]:
    views = list(views) if views is not None else []
    if not views:
        raise IdtoError("no photos to fit the texture to; pass at least one photo with its fitted camera")
    for i, v in enumerate(views):
        image = getattr(v, "image", None)
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            shape = tuple(image.shape) if isinstance(image, np.ndarray) else type(image).__name__
            raise IdtoError(f"photo {i}: image must be an RGB array [H, W, 3], got {shape}")
        if image.dtype != np.uint8:
            raise IdtoError(f"photo {i}: image must be uint8 RGB (0-255), got dtype {image.dtype}")
        if min(image.shape[:2]) < 8:
            raise IdtoError(f"photo {i}: image is too small ({image.shape[1]}x{image.shape[0]} pixels)")
        cam = getattr(v, "camera", None)
        if not isinstance(cam, Camera) or len(cam) != 1:
            got = f"{len(cam)} cameras" if isinstance(cam, Camera) else type(cam).__name__
            raise IdtoError(f"photo {i}: camera must be one idto3d Camera (a batch of 1), got {got}")
        try:
            lm = np.asarray(getattr(v, "landmarks", None), dtype=np.float64)
        except (TypeError, ValueError):
            lm = np.zeros(0)
        if lm.shape != (N_LANDMARKS, 2):
            raise IdtoError(f"photo {i}: landmarks must be a [{N_LANDMARKS}, 2] array of pixel positions "
                            f"(dlib's 68 points), got shape {lm.shape}")
        if not np.isfinite(lm).all():
            raise IdtoError(f"photo {i}: landmarks contain NaN or infinite values")
    return views


def _check_cfg(cfg: PhotoTextureConfig) -> None:
    if not cfg.min_cos < cfg.full_cos:
        raise IdtoError(f"photo_texture.min_cos ({cfg.min_cos}) must be below photo_texture.full_cos "
                        f"({cfg.full_cos})")


def _check_surface(surface: PhotoSurface) -> None:
    for name in ("mesh", "uv", "attribute_faces", "texels"):
        if not hasattr(surface, name):
            raise IdtoError(f"the textured surface has no {name!r}; pass the texture stage's TexturedExpression "
                            "(mesh, uv, attribute_faces, texels)")
    if surface.attribute_faces.shape != surface.mesh.faces.shape:
        raise IdtoError(f"attribute_faces {tuple(surface.attribute_faces.shape)} must match the mesh's faces "
                        f"{tuple(surface.mesh.faces.shape)}")


# ---------------------------------------------------------------- geometry helpers


def _smoothstep(lo: float, hi: float, x: torch.Tensor) -> torch.Tensor:
    t = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _charbonnier(d: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(d * d + _CHARBONNIER_EPS ** 2) - _CHARBONNIER_EPS


def _toward_camera(camera: Camera, points: torch.Tensor) -> torch.Tensor:
    """Unit directions from ``points`` ``[..., 3]`` to the camera (its +Z axis for an affine projection)."""
    view = camera.view[0].to(points.dtype)
    proj = camera.proj[0]
    rot, t = view[:3, :3], view[:3, 3]
    if abs(float(proj[3, 2])) < 1e-12:  # orthographic: one direction for every point
        return rot[2].expand_as(points)
    eye = -rot.T @ t
    return F.normalize(eye - points, dim=-1)


def texel_normals(surface: PhotoSurface) -> torch.Tensor:
    """Smooth (welded) surface normals ``[N, 3]`` at the covered texels.

    The UV layout is rasterised again exactly as ``texel_map`` does it, to learn which triangle (and
    where in it) each covered texel lies: the texel map stores only the points.
    """
    texels = surface.texels
    uv = surface.uv.detach().float().cpu()
    uv_faces = surface.attribute_faces.detach().long().cpu()
    clip = torch.cat([uv * 2.0 - 1.0, torch.full_like(uv[:, :1], 0.5), torch.ones_like(uv[:, :1])], dim=1)
    with torch.no_grad():
        frags = rasterize_torch.rasterize(clip, uv_faces, texels.size)
    index = texels.texel_index.cpu()
    face = frags.triangle_id.reshape(-1)[index]
    if face.numel() == 0 or bool((face < 0).any()):
        raise IdtoError("the texel map does not match the surface's UV layout; build both from the same atlas")
    bary = frags.bary.reshape(-1, 3)[index]
    mesh = surface.mesh.detach().to("cpu")
    vn = mesh.vertex_normals()[mesh.faces[face]]  # [N, 3 corners, 3]
    return F.normalize((bary.unsqueeze(-1) * vn).sum(1), dim=-1)


def _working_size(h: int, w: int, long_side: int) -> tuple[int, int]:
    s = min(1.0, long_side / max(h, w))
    return max(1, round(h * s)), max(1, round(w * s))


def _resize(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> float ``[h, w, 3]`` in [0, 1] (antialiased when shrinking)."""
    img = torch.from_numpy(np.array(image, dtype=np.float32)).div(255.0)  # a copy: photos may be read-only
    if tuple(img.shape[:2]) == size:
        return img
    out = F.interpolate(img.permute(2, 0, 1)[None], size=size, mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).clamp(0.0, 1.0)


def _polygon_mask(points_xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels (centres at integer coordinates) inside the convex hull of ``points_xy`` ``[K, 2]``."""
    try:
        hull = ConvexHull(points_xy)
    except (QhullError, ValueError):
        return np.zeros(shape, dtype=bool)
    ring = points_xy[hull.vertices]
    return polygon2mask(shape, ring[:, ::-1])  # skimage wants (row, col)


def face_region(landmarks: np.ndarray, shape: tuple[int, int], forehead: float, erode: float
                ) -> tuple[np.ndarray, float]:
    """Soft face-region weights ``[h, w]`` in [0, 1] and the face height in pixels (see the module docstring).

    ``landmarks`` ``[68, 2]`` are in this image's pixels (dlib order, x right, y down).
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    brows = lm[_BROWS]
    up = brows.mean(0) - lm[_CHIN]
    brow_to_chin = float(np.linalg.norm(up))
    if not brow_to_chin > 1e-6:
        raise IdtoError("the landmarks' brows coincide with the chin; these are not face landmarks")
    up /= brow_to_chin
    top = brows + forehead * brow_to_chin * up
    inside = _polygon_mask(np.concatenate([lm, top]), shape)
    height = brow_to_chin * (1.0 + forehead)
    margin = erode * height
    depth = ndimage.distance_transform_edt(inside)  # pixels to the nearest outside pixel
    soft = np.clip((depth - margin) / max(margin, 1.0), 0.0, 1.0).astype(np.float32)
    return soft, height


def _skin_pixels(image: torch.Tensor, landmarks: np.ndarray, soft: np.ndarray, height: float,
                 erode: float) -> torch.Tensor:
    """Photo pixels ``[M, 3]`` of plain skin: the face region's core minus brows, eyes and mouth."""
    keep = _skin_mask(landmarks, soft, height, erode)
    return image[torch.from_numpy(keep)] if keep.any() else image.new_zeros(0, 3)


def _skin_mask(landmarks: np.ndarray, soft: np.ndarray, height: float, erode: float) -> np.ndarray:
    """``[h, w]`` bool: the plain-skin pixels of ``_skin_pixels``."""
    shape = soft.shape
    features = np.zeros(shape, dtype=bool)
    for part in _FEATURES:
        features |= _polygon_mask(np.asarray(landmarks, dtype=np.float64)[part], shape)
    grow = max(2.0, 2.0 * erode * height)
    features = ndimage.distance_transform_edt(~features) <= grow
    for keep in (soft >= 1.0) & ~features, soft >= 1.0, soft > 0.0:
        if keep.any():
            return keep
    return np.zeros(shape, dtype=bool)


# ---------------------------------------------------------------- per-photo data


@dataclass
class _View:
    uv: torch.Tensor           # [P, 2] texture coordinates of the counted pixels
    position: torch.Tensor     # [P, 3] the surface point each shows
    target: torch.Tensor       # [P, 3] photo colours there
    weight: torch.Tensor       # [P] region feather x facing
    core: torch.Tensor         # [P] bool: inside the face region proper (for the reported RMSE)
    texel_weight: torch.Tensor  # [N] how well this photo sees each covered texel
    skin: torch.Tensor         # [M, 3] plain-skin photo pixels
    normal: torch.Tensor       # [P, 3] the surface normal each counted pixel shows (for the de-lighting)
    texel_pixel: torch.Tensor  # [N] working-render pixel (flat index) each covered texel projects to
    texel_seen: torch.Tensor   # [N] bool: that pixel shows the texel (z-buffer) and it faces the camera
    size: tuple[int, int]      # working render (h, w)
    gain: torch.Tensor | None = None  # [3] the face's median de-lighting gain (None: not de-lit)
    plain_skin: torch.Tensor | None = None  # [P] bool: the counted pixels that are plain skin


def _prepare_view(i: int, view: PhotoView, surface: PhotoSurface, normals: torch.Tensor, long_side: int,
                  cfg: PhotoTextureConfig, rasterizer: Rasterizer) -> _View:
    H, W = view.image.shape[:2]
    h, w = _working_size(H, W, long_side)
    image = _resize(view.image, (h, w))
    lm = np.asarray(view.landmarks, dtype=np.float64)
    lm = (lm + 0.5) * np.array([w / W, h / H]) - 0.5  # pixel centres scale about the image corner
    soft_np, height = face_region(lm, (h, w), cfg.forehead, cfg.erode)
    if not soft_np.any():
        raise IdtoError(f"photo {i}: the face region from its landmarks is empty at {w}x{h} pixels; check the "
                        "landmarks lie on the face in this photo's pixel coordinates")
    soft = torch.from_numpy(soft_np)

    mesh = surface.mesh.detach().to("cpu")
    camera = view.camera.to("cpu")
    uv = surface.uv.detach().float().cpu()
    uv_faces = surface.attribute_faces.detach().long().cpu()
    with torch.no_grad():
        clip = camera.project(mesh.vertices.float())
        frags = rasterizer.rasterize(clip, mesh.faces, (h, w))
        covered = frags.mask[0]
        view_mat = camera.view[0].float()
        cam_z = mesh.vertices.float() @ view_mat[2, :3] + view_mat[2, 3]  # view-space z (negative ahead)
        attrs = torch.cat([mesh.vertices.float(), mesh.vertex_normals(), cam_z[:, None]], dim=1)
        px = rasterizer.interpolate(attrs, frags, mesh.faces)[0]  # [h, w, 7]
        px_uv = rasterizer.interpolate(uv, frags, uv_faces)[0]
        px_pos, px_n, px_z = px[..., :3], F.normalize(px[..., 3:6], dim=-1), px[..., 6]
        facing = _smoothstep(cfg.min_cos, cfg.full_cos, (px_n * _toward_camera(camera, px_pos)).sum(-1))
        weight = soft * facing * covered
        sel = weight > 0
        if not bool(sel.any()):
            raise IdtoError(f"photo {i}: the head, rendered from its fitted camera, does not cover the face "
                            "region of the photo; check the camera and the landmarks belong to this photo")

        # Texel visibility: project each texel's point and compare depths with the rendered surface.
        points = surface.texels.points.detach().float().cpu()
        tclip = camera.project(points)[0]
        tw = tclip[:, 3]
        ahead = tw > 1e-8
        ndc = tclip[:, :2] / torch.where(ahead, tw, torch.ones_like(tw))[:, None]
        col = torch.floor((ndc[:, 0] + 1.0) * 0.5 * w).long()
        row = torch.floor((1.0 - ndc[:, 1]) * 0.5 * h).long()
        inside = ahead & (col >= 0) & (col < w) & (row >= 0) & (row < h)
        flat = (row.clamp(0, h - 1) * w + col.clamp(0, w - 1))
        texel_z = points @ view_mat[2, :3] + view_mat[2, 3]
        extent = float((mesh.vertices.amax(0) - mesh.vertices.amin(0)).max())
        pixel = 2.0 * tw.abs() / (w * abs(float(camera.proj[0, 0, 0])))  # world size of a pixel there
        tolerance = _DEPTH_TOLERANCE * extent + 2.0 * pixel
        visible = inside & covered.reshape(-1)[flat] & (px_z.reshape(-1)[flat] - texel_z <= tolerance)
        t_facing = _smoothstep(cfg.min_cos, cfg.full_cos, (normals * _toward_camera(camera, points)).sum(-1))
        texel_weight = visible.float() * t_facing * soft.reshape(-1)[flat]

    return _View(uv=px_uv[sel], position=px_pos[sel], target=image[sel], weight=weight[sel],
                 core=(soft >= 0.5)[sel],
                 texel_weight=texel_weight, skin=_skin_pixels(image, lm, soft_np, height, cfg.erode),
                 normal=px_n[sel], texel_pixel=flat, texel_seen=visible & (t_facing > 0.5), size=(h, w),
                 plain_skin=torch.from_numpy(_skin_mask(lm, soft_np, height, cfg.erode))[sel])


def _prepare(surface: PhotoSurface, views: Sequence[PhotoView], long_side: int, cfg: PhotoTextureConfig
             ) -> list[_View]:
    _check_surface(surface)
    views = _check_views(views)
    _check_cfg(cfg)
    normals = texel_normals(surface)
    rasterizer = get_rasterizer("torch", torch.device("cpu"))  # host-side, once per photo
    return [_prepare_view(i, v, surface, normals, long_side, cfg, rasterizer) for i, v in enumerate(views)]


def photo_weights(surface: PhotoSurface, views: Sequence[PhotoView], resolution: int,
                  cfg: PhotoTextureConfig | None = None) -> torch.Tensor:
    """``[N]`` per covered texel of ``surface.texels``: how well the best photo sees it, in [0, 1].

    0 when no photo sees it (occluded by the z-buffer, facing away (cosine <= ``min_cos``) or outside
    every photo's face region); 1 when it faces a camera squarely (cosine >= ``full_cos``) well inside
    a face region. ``resolution`` is the long side of the working renders; ``cfg`` gives the region and
    angle settings (defaults when None).
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
        raise IdtoError(f"resolution must be an integer >= 8 (long side in pixels), got {resolution!r}")
    cfg = cfg if cfg is not None else PhotoTextureConfig()
    return _best_weight(_prepare(surface, views, resolution, cfg))


@dataclass
class _Extension:
    """How the colours of well-seen texels are carried onto the rest of the surface (see ``_extend``)."""

    source: torch.Tensor  # [N, K] indices of nearby well-seen texels
    kernel: torch.Tensor  # [N, K] normalised weights over them
    ramp: torch.Tensor    # [N] 1 on well-seen texels, smoothstep to 0 at ``falloff`` from the nearest one


def _extension(points: torch.Tensor, weight: torch.Tensor, falloff: float) -> _Extension | None:
    well = (weight >= SEEN_WELL).nonzero().squeeze(1)
    if well.numel() == 0:
        return None
    k = min(_EXTEND_NEIGHBOURS, int(well.numel()))
    dist, idx = cKDTree(points[well].numpy()).query(points.numpy(), k=k, workers=1)
    dist = torch.from_numpy(np.asarray(dist, dtype=np.float32)).reshape(-1, k)
    idx = torch.from_numpy(np.asarray(idx, dtype=np.int64)).reshape(-1, k)
    nearest = dist[:, :1]
    # Weights relative to the nearest well-seen texel, so a far texel still averages a patch of the
    # border (a smooth colour) rather than copying one texel (Voronoi cells in the colour).
    kernel = weight[well][idx] * torch.exp(-((dist - nearest) / (_EXTEND_WIDTH * falloff)) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True).clamp(min=1e-12)
    return _Extension(well[idx], kernel, _smoothstep(0.0, 1.0, 1.0 - nearest[:, 0] / falloff))


# ---------------------------------------------------------------- the fit


@torch.no_grad()
def _warm_start(field: TextureField, expression: int, points: torch.Tensor, skin: torch.Tensor) -> None:
    """Shift the albedo head's bias so the mean albedo logit over the surface is the skin tone's.

    A fresh field (uniform grey) becomes uniform skin: most texels (back of the head, neck) then start
    at their target, and the steps go to the face instead of repainting the whole head.
    """
    albedo = torch.cat([field(expression, p)["albedo"] for p in points.split(1 << 15)]).clamp(1e-4, 1.0 - 1e-4)
    target = skin.clamp(0.02, 0.98).to(albedo)
    shift = torch.logit(target) - torch.logit(albedo).mean(0)
    field.head.bias[:3] += shift.to(field.head.bias)


def bilinear_taps(uv: torch.Tensor, texels: TexelMap) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_texture``'s bilinear lookup at ``uv`` ``[P, 2]`` of a texture baked on ``texels``, as taps:
    ``(index [P, 4], weight [P, 4])`` with ``index`` into the covered texels (0..N-1).

    Sampling a baked texture is then ``(weight[..., None] * values[index]).sum(1)`` for per-texel
    ``values``: the same numbers as ``grid_sample`` (``align_corners=False``, border padding) on
    ``scatter_texels(values)``, but only the texels the photos look at need evaluating.
    """
    size = texels.size
    x = (uv[:, 0] * size - 0.5).clamp(0.0, size - 1.0)
    y = ((1.0 - uv[:, 1]) * size - 0.5).clamp(0.0, size - 1.0)  # v = 1 is row 0
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=size - 1), (y0 + 1).clamp(max=size - 1)
    flat = torch.stack([y0 * size + x0, y0 * size + x1, y1 * size + x0, y1 * size + x1], 1)
    weight = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], 1)
    return texels.fill_index.to(flat.device)[flat], weight


def _same_place_taps(view: _View, texels: TexelMap) -> tuple[torch.Tensor, torch.Tensor]:
    """``bilinear_taps`` without the taps that land on another part of the surface.

    Near a chart border a tap can read a padding texel, which ``texel_map`` fills from the nearest
    covered texel in UV, possibly one of a neighbouring chart that lies elsewhere on the head (charts are
    packed ~1 texel apart at 256^2). Fitting it to the photo would paint a face colour on that spot of
    the 3-D field (a blotch in every bake, the export's included). Taps farther in 3-D than a few texel
    spacings from the pixel's own surface point are dropped and the rest renormalised.
    """
    index, weight = bilinear_taps(view.uv, texels)
    points = texels.points
    reach = _TAP_REACH * _texel_spacing(texels)
    near = (points[index] - view.position[:, None]).norm(dim=-1) <= reach
    weight = weight * near
    return index, weight / weight.sum(1, keepdim=True).clamp(min=1e-12)


def _texel_spacing(texels: TexelMap) -> float:
    """Median 3-D distance between horizontally adjacent covered texels (xatlas' texel density is uniform)."""
    size = texels.size
    position = torch.full((size * size,), -1, dtype=torch.long)
    position[texels.texel_index] = torch.arange(texels.texel_index.numel())
    left = texels.texel_index[(texels.texel_index % size) < size - 1]
    right = position[left + 1]
    pairs = right >= 0
    if not bool(pairs.any()):
        return float("inf")
    d = (texels.points[position[left[pairs]]] - texels.points[right[pairs]]).norm(dim=-1)
    return float(d.median())


def _host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the device's queued work (a plain copy to CUDA waits)."""
    return t.to(device, non_blocking=device.type == "cuda")


def _check_fit_args(field: TextureField, expression: int, log_every: int) -> None:
    if isinstance(expression, bool) or not isinstance(expression, int) or not 0 <= expression < field.n_expressions:
        raise IdtoError(f"expression index must be an integer in [0, {field.n_expressions}), got {expression!r}")
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise IdtoError(f"log_every must be a positive number of steps, got {log_every!r}")


def _best_weight(prepared: Sequence[_View]) -> torch.Tensor:
    """``[N]`` per covered texel: the weight of the photo that sees it best."""
    return torch.stack([p.texel_weight for p in prepared]).amax(0)


def _skin_tone(prepared: Sequence[_View]) -> torch.Tensor:
    """``[3]`` the per-channel median of the photos' plain-skin pixels (mid-grey if there are none)."""
    skin_px = torch.cat([p.skin for p in prepared])
    return skin_px.median(0).values if skin_px.shape[0] else torch.full((3,), 0.5)


@dataclass
class _Photometric:
    """The photos' term, on the device: each photo's pixels and their taps into the every-step texels."""

    tap_pos: list[torch.Tensor]     # [P, 4] positions in the every-step texels
    tap_weight: list[torch.Tensor]  # [P, 4]
    target: list[torch.Tensor]      # [P, 3] photo colours
    weight: list[torch.Tensor]      # [P] feather x facing, 0 where no tap is left

    def loss(self, albedo: torch.Tensor) -> torch.Tensor:
        """Charbonnier per photo (weighted mean over its pixels), then the mean over photos."""
        terms = []
        for pos, w_tap, target, w_px in zip(self.tap_pos, self.tap_weight, self.target, self.weight):
            pred = (w_tap[..., None] * albedo[pos]).sum(1)
            terms.append((w_px[:, None] * _charbonnier(pred - target)).sum() / (3.0 * w_px.sum()))
        return torch.stack(terms).mean()


def _every_step_texels(prepared: Sequence[_View], texels: TexelMap, seen: torch.Tensor, device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor, _Photometric]:
    """The texels evaluated at every step (host, sorted), each covered texel's position among them (-1 if not
    one) and the photometric term that reads them.

    They are those the photos' pixels sample and the well-seen ones (the fill's sources); the fill's texels are
    drawn on top of them, a random subset per step.
    """
    taps = [_same_place_taps(p, texels) for p in prepared]
    well = (seen >= SEEN_WELL).nonzero().squeeze(1)
    every_step, inverse = torch.unique(torch.cat([t.reshape(-1) for t, _ in taps] + [well]), return_inverse=True)
    n_taps = sum(t.numel() for t, _ in taps)
    tap_pos = inverse[:n_taps].split([t.numel() for t, _ in taps])
    position = torch.full((seen.shape[0],), -1, dtype=torch.long)
    position[every_step] = torch.arange(every_step.numel())
    photometric = _Photometric(
        tap_pos=[pos.view(-1, 4).to(device) for pos in tap_pos], tap_weight=[w.to(device) for _, w in taps],
        target=[p.target.to(device) for p in prepared],
        weight=[(p.weight * (w.sum(1) > 0)).to(device) for p, (_, w) in zip(prepared, taps)])
    return every_step, position, photometric


@dataclass
class _Fill:
    """The pull of the texels not seen well toward the face's colours carried outward, fading into skin."""

    candidates: torch.Tensor      # [C] host: the texels it may draw (seen weight below SEEN_WELL)
    on_device: torch.Tensor       # the same on the device: the draw when all are used
    count: int                    # texels drawn per step
    share: float                  # C / N: rescales the sampled mean to a mean over all texels
    unseen: torch.Tensor          # [N] device: the pull's weight, 0 on well-seen texels
    skin: torch.Tensor            # [3] device
    kernel: torch.Tensor | None   # [N, K] device, see _Extension (None: no texel is seen well)
    ramp: torch.Tensor | None     # [N] device
    source_pos: torch.Tensor | None  # [N, K] device: the extension's sources among the every-step texels

    def draw(self, sampler: torch.Generator, device: torch.device) -> torch.Tensor:
        # Drawn on the host from the seeded generator: the same texels on any device.
        if self.count < self.candidates.numel():
            return _host_to_device(
                self.candidates[torch.randperm(self.candidates.numel(), generator=sampler)[:self.count]], device)
        return self.on_device

    def loss(self, fill: torch.Tensor, albedo_every: torch.Tensor, albedo_fill: torch.Tensor) -> torch.Tensor:
        if self.kernel is None:
            goal = (self.skin[fill] if self.skin.dim() == 2 else self.skin).expand_as(albedo_fill)
        else:
            near = (self.kernel[fill][..., None] * albedo_every.detach()[self.source_pos[fill]]).sum(1)
            skin = self.skin[fill] if self.skin.dim() == 2 else self.skin  # per texel where there is hair
            goal = skin + self.ramp[fill][:, None] * (near - skin)
        # Squared, not robust: the fill's targets are smooth (no outliers), and an L1 pull over most
        # texels keeps tugging the shared network at full strength however small its residual is.
        return (self.unseen[fill][:, None] * (albedo_fill - goal).square()).mean()


def _hair_texels(views: Sequence[PhotoView], prepared: Sequence[_View], points: torch.Tensor, skin: torch.Tensor
                 ) -> tuple[torch.Tensor, tuple[float, float, float], tuple[float, float, float]] | None:
    """``(texels [N] bool, hair albedo, hair colour in the photos)``: the scalp above the hairline the photos show (``texture.hair``), and
    the photos' texels that show hair; None when no photo shows hair."""
    from skimage.transform import resize

    from idto3d.texture.hair import forehead_side, hairline_height, scalp, segment_hair

    # The photo's hair against the photo's skin (before de-lighting); its colour then de-lit like the face's.
    gains = [p.gain if p.gain is not None else torch.ones(3) for p in prepared]
    found = [(v, p, segment_hair(v.image, v.landmarks, (skin / g).clamp(0, 1).numpy()), g)
             for v, p, g in zip(views, prepared, gains)]
    found = [(v, p, hair, g) for v, p, hair, g in found if hair is not None]
    if not found:
        return None
    seen_hair = torch.zeros(points.shape[0], dtype=torch.bool)
    nape = []
    for view, p, hair, _ in found:
        small = resize(hair.mask, p.size, order=0, anti_aliasing=False).astype(bool)
        seen_hair |= p.texel_seen & torch.from_numpy(small.reshape(-1))[p.texel_pixel]
        # The nape's height: the seen surface point nearest (in the image) to the nose base (landmark 33).
        h, w = p.size
        H, W = view.image.shape[:2]
        target = (np.asarray(view.landmarks[33], dtype=np.float64) + 0.5) * np.array([w / W, h / H]) - 0.5
        col, row = p.texel_pixel % w, p.texel_pixel // w
        d = (col - target[0]) ** 2 + (row - target[1]) ** 2
        d = torch.where(p.texel_seen, d.double(), torch.full_like(d, float("inf"), dtype=torch.float64))
        nape.append(float(points[int(d.argmin()), 1]))
    line = hairline_height(points, seen_hair, forehead_side(points))
    if line is None:
        return None
    tones = np.median(np.array([(torch.tensor(hair.tone) * g).clamp(0, 1).numpy() for _, _, hair, g in found]), axis=0)
    raw = np.median(np.array([hair.tone for _, _, hair, _ in found]), axis=0)
    return scalp(points, line, float(np.mean(nape))) | seen_hair, tuple(float(c) for c in tones), \
        tuple(float(c) for c in raw)


def _fill(points: torch.Tensor, seen: torch.Tensor, skin: torch.Tensor, position: torch.Tensor,
          cfg: PhotoTextureConfig, device: torch.device,
          hair: tuple[torch.Tensor, tuple[float, float, float]] | None = None) -> _Fill:
    extension = _extension(points, seen, cfg.falloff)
    if hair is not None:
        # Unseen scalp texels take the hair's colour outright (not the face's colours carried over).
        skin = torch.where(hair[0][:, None], torch.tensor(hair[1]), skin)
        if extension is not None:
            extension.ramp = torch.where(hair[0], torch.zeros_like(extension.ramp), extension.ramp)
    # Well-seen texels follow the photos alone; the fill takes over as the seen weight drops to 0.
    unseen = (1.0 - seen / SEEN_WELL).clamp(min=0.0)
    candidates = (unseen > 0).nonzero().squeeze(1)
    count = candidates.numel() if cfg.fill_texels == 0 else min(cfg.fill_texels, candidates.numel())
    kernel = ramp = source_pos = None
    if extension is not None:
        source_pos = position[extension.source]  # sources are well-seen, hence evaluated every step
        assert bool((source_pos >= 0).all())
        # Everything a step indexes lives on the device from here on; only the fill's draw is made on the host.
        kernel, ramp, source_pos = (t.to(device) for t in (extension.kernel, extension.ramp, source_pos))
    return _Fill(candidates=candidates, on_device=candidates.to(device), count=count,
                 share=candidates.numel() / points.shape[0], unseen=unseen.to(device), skin=skin.to(device),
                 kernel=kernel, ramp=ramp, source_pos=source_pos)


def _delight(prepared: Sequence[_View]) -> torch.Tensor:
    """Divide the photos' lighting out of their targets and skin pixels, in place (``texture.delight``): one SH
    light fitted to every photo's face pixels (one light: the photos of a run are usually taken together).
    Returns its coefficients ``[9, 3]``."""
    from idto3d.texture.delight import delight

    normals = torch.cat([p.normal for p in prepared])
    targets = torch.cat([p.target for p in prepared])
    weight = torch.cat([p.weight * p.core for p in prepared])
    albedo, coeffs = delight(targets, normals, weight)
    for p, part in zip(prepared, albedo.split([p.target.shape[0] for p in prepared])):
        # The plain-skin pixels (no normals of their own) take the face's median de-lighting gain.
        gain = (part[p.core] + 1e-3) / (p.target[p.core] + 1e-3) if bool(p.core.any()) else torch.ones(1, 3)
        p.gain = gain.median(0).values
        # The skin tone from the de-lit plain-skin pixels the head covers (their own shading removed); the
        # photo's other skin pixels (no normals) only where the head covers none.
        plain = p.plain_skin if p.plain_skin is not None else torch.zeros(0, dtype=torch.bool)
        p.skin = part[plain] if int(plain.sum()) >= 16 else (p.skin * p.gain).clamp(0.0, 1.0)
        p.target = part.to(p.target)
    return coeffs


def _lr_scale(step: int, iterations: int) -> float:
    # Cosine decay to a tenth: Adam at a constant rate keeps the colours jittering at the end.
    return _FINAL_LR + (1.0 - _FINAL_LR) * 0.5 * (1.0 + math.cos(math.pi * step / max(iterations, 1)))


def _optimise(field: TextureField, cfg: PhotoTextureConfig, step_loss: Callable[[], torch.Tensor],
              progress: Callable[[int, float], None] | None, log_every: int) -> None:
    opt = texture_optimizer(field, cfg.lr)
    base_lr = [g["lr"] for g in opt.param_groups]
    latest = float("nan")
    with reproducible_kernels(next(field.parameters()).device):
        for step in range(cfg.iterations):
            scale = _lr_scale(step, cfg.iterations)
            for group, lr in zip(opt.param_groups, base_lr):
                group["lr"] = lr * scale
            loss = step_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if progress is not None:
                if step % log_every == 0 or step == cfg.iterations - 1:
                    latest = float(loss.detach())  # waits for the device: only every log_every steps
                progress(step + 1, latest)


@torch.no_grad()
def _photometric_rmse(field: TextureField, expression: int, texels: TexelMap, prepared: Sequence[_View],
                      device: torch.device) -> float:
    """The face region's sRGB error through the renderer's own path: the full baked texture, sampled."""
    texture = field.bake(expression, texels.to(device), chunk=1 << 15)["albedo"]
    sq, count = 0.0, 0
    for p in prepared:
        pred = sample_texture(texture, p.uv.to(device).view(1, -1, 1, 2)).view(-1, 3)
        core = p.core.to(device)
        sq += float((pred - p.target.to(device))[core].square().sum())
        count += int(p.core.sum()) * 3
    return (sq / count) ** 0.5 if count else float("nan")


def fit_photo_texture(field: TextureField, expression: int, expr: PhotoSurface, views: Sequence[PhotoView],
                      cfg: PhotoTextureConfig, *, seed: int = 0,
                      progress: Callable[[int, float], None] | None = None,
                      device: torch.device | str | None = None, log_every: int = 10, delight: bool = False,
                      hair: bool = False) -> PhotoTextureReport:
    """Optimise ``field`` in place so expression ``expression``'s flat albedo render matches ``views``.

    ``expr`` is the expression's textured surface (the texture stage's ``TexturedExpression``, or
    anything with ``mesh``, ``uv``, ``attribute_faces`` and ``texels``). Raises ``IdtoError`` on bad
    inputs (no photos, malformed images/landmarks/cameras, a camera that misses the face) before any step.
    ``device``: where the steps run (None = where ``field`` is); the field is moved there and stays there.
    ``delight``: divide the photos' lighting out first (``texture.delight``); ``hair``: give the scalp the colour
    of the hair the photos show (``texture.hair``). ``idto3d generate`` turns both on (they are not config keys: a
    new key would change every earlier run folder's config and stop it resuming).
    """
    t0 = time.perf_counter()
    _check_fit_args(field, expression, log_every)
    prepared = _prepare(expr, views, cfg.resolution, cfg)
    light = _delight(prepared) if delight else None
    device = field.codes.device if device is None else torch.device(device)
    field.to(device)
    texels = expr.texels.to("cpu")
    points = texels.points.detach().float()
    seen = _best_weight(prepared)
    skin = _skin_tone(prepared)
    every_step, position, photometric = _every_step_texels(prepared, texels, seen, device)
    hair = _hair_texels(views, prepared, points, skin) if hair else None
    fill = _fill(points, seen, skin, position, cfg, device, hair)
    _warm_start(field, expression, points.to(device), skin.to(device))
    points, every_step = points.to(device), every_step.to(device)
    sampler = torch.Generator().manual_seed(seed)

    def step_loss() -> torch.Tensor:
        drawn = fill.draw(sampler, device)
        out = field(expression, points[torch.cat([every_step, drawn])])
        albedo_e, albedo_f = out["albedo"].split([every_step.numel(), drawn.numel()])
        loss = photometric.loss(albedo_e)
        if drawn.numel():
            loss = loss + cfg.skin_weight * fill.share * fill.loss(drawn, albedo_e, albedo_f)
        return loss + (out["roughness"] - SKIN_ROUGHNESS).square().mean() + \
            (out["metallic"] - SKIN_METALLIC).square().mean()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _optimise(field, cfg, step_loss, progress, log_every)
        rmse = _photometric_rmse(field, expression, expr.texels, prepared, device)
    return PhotoTextureReport(seen_fraction=float((seen >= SEEN_WELL).float().mean()),
                              skin_tone=tuple(float(c) for c in skin),  # type: ignore[arg-type]
                              photometric_rmse=rmse, seconds=time.perf_counter() - t0,
                              light_sh=None if light is None else light.tolist(),
                              hair_tone=None if hair is None else hair[1],
                              hair_photo_tone=None if hair is None else hair[2],
                              hair_fraction=0.0 if hair is None else float(hair[0].float().mean()))
