"""PBR texture maps and their PNG encodings.

Maps are ``[H, W, ...]`` arrays with row 0 at the top of the image (UV origin bottom-left, see
``uv_atlas``). ``albedo`` holds display-referred (sRGB-encoded) colours in ``[0, 1]`` and is
stored as-is; ``roughness`` / ``metallic`` are linear scalars in ``[0, 1]``; the optional
``normal`` map holds tangent-space unit vectors in ``[-1, 1]`` (+Z out of the surface, +Y along
increasing ``v``: the glTF/OpenGL convention).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from idto3d.core.errors import IdtoError


class MapError(IdtoError):
    """A texture map has the wrong shape or values."""


def _array(x: np.ndarray | torch.Tensor, name: str, channels: int | None, lo: float, hi: float) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float32)
    if channels is None and a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    want = "[H, W]" if channels is None else f"[H, W, {channels}]"
    ok_shape = a.ndim == 2 if channels is None else (a.ndim == 3 and a.shape[2] == channels)
    if not ok_shape or a.shape[0] < 1 or a.shape[1] < 1:
        raise MapError(f"the {name} map must be a {want} array, got shape {tuple(a.shape)}")
    if not np.isfinite(a).all():
        raise MapError(f"the {name} map has NaN or infinite values")
    tol = 1e-3
    if a.min() < lo - tol or a.max() > hi + tol:
        raise MapError(f"the {name} map must lie in [{lo}, {hi}], got [{a.min():.4g}, {a.max():.4g}]")
    return np.clip(a, lo, hi)


@dataclass(frozen=True)
class PBRMaps:
    """Validated metallic-roughness maps (see the module docstring for value conventions)."""

    albedo: np.ndarray
    roughness: np.ndarray
    metallic: np.ndarray
    normal: np.ndarray | None = None

    @classmethod
    def create(cls, albedo, roughness, metallic, normal=None) -> "PBRMaps":  # noqa: ANN001 (arrays or tensors)
        a = _array(albedo, "albedo", 3, 0.0, 1.0)
        r = _array(roughness, "roughness", None, 0.0, 1.0)
        m = _array(metallic, "metallic", None, 0.0, 1.0)
        if r.shape != m.shape:
            # glTF packs both into one texture, so they must share a resolution.
            raise MapError(f"roughness {r.shape} and metallic {m.shape} maps must have the same size")
        n = None if normal is None else _array(normal, "normal", 3, -1.0, 1.0)
        return cls(a, r, m, n)


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encode a uint8 ``[H, W]`` or ``[H, W, 3]`` array as PNG (deterministic, no metadata)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def albedo_png(maps: PBRMaps) -> bytes:
    return png_bytes(to_uint8(maps.albedo))


def metallic_roughness_png(maps: PBRMaps) -> bytes:
    """glTF's packed texture: G = roughness, B = metallic; R is unused by glTF, set to 1 (no occlusion)."""
    h, w = maps.roughness.shape
    rgb = np.empty((h, w, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    rgb[..., 1] = to_uint8(maps.roughness)
    rgb[..., 2] = to_uint8(maps.metallic)
    return png_bytes(rgb)


def normal_png(maps: PBRMaps) -> bytes:
    assert maps.normal is not None
    n = maps.normal / np.maximum(np.linalg.norm(maps.normal, axis=-1, keepdims=True), 1e-8)
    return png_bytes(to_uint8(n * 0.5 + 0.5))
