"""Orbit cameras around the head, in the OpenGL convention.

World: +Y up, the head faces +Z. A camera looks down its own -Z with +Y up and +X right;
``proj`` maps camera space to OpenGL clip space (NDC x, y, z in [-1, 1] after the divide by w).
Azimuth 0 puts the camera on +Z (front view), azimuth 90 on +X; elevation > 0 puts it above.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from idto3d.core.errors import IdtoError

Number = float | int
ScalarOrTensor = Number | Sequence[Number] | torch.Tensor


@dataclass
class Camera:
    """A batch of ``B`` cameras; every field has the batch as its first dimension."""

    view: torch.Tensor  # [B, 4, 4] world -> camera
    proj: torch.Tensor  # [B, 4, 4] camera -> clip (OpenGL perspective)
    eye: torch.Tensor  # [B, 3] camera position in world space
    elevation_deg: torch.Tensor  # [B]
    azimuth_deg: torch.Tensor  # [B]
    radius: torch.Tensor  # [B]
    fov_deg: torch.Tensor  # [B] vertical field of view

    @property
    def mvp(self) -> torch.Tensor:
        """World -> clip matrices ``[B, 4, 4]`` (the model matrix is the identity)."""
        return self.proj @ self.view

    @property
    def device(self) -> torch.device:
        return self.view.device

    def __len__(self) -> int:
        return self.view.shape[0]

    def __getitem__(self, index: int | slice | torch.Tensor) -> "Camera":
        """A sub-batch; an integer index keeps the batch dimension (``cam[i]`` has length 1)."""
        if isinstance(index, int):
            if not -len(self) <= index < len(self):
                raise IndexError(f"camera index {index} out of range for {len(self)} cameras")
            index = slice(index, index + 1 if index != -1 else None)
        return Camera(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to(self, device: torch.device | str) -> "Camera":
        from idto3d.core.device import to_device

        return Camera(**{f.name: to_device(getattr(self, f.name), device) for f in fields(self)})

    def project(self, points: torch.Tensor) -> torch.Tensor:
        """World points ``[V, 3]`` (shared) or ``[B, V, 3]`` to clip space ``[B, V, 4]``."""
        if points.dim() == 2:
            points = points.unsqueeze(0)
        if points.dim() != 3 or points.shape[-1] != 3:
            raise IdtoError(f"points must be [V, 3] or [B, V, 3], got {tuple(points.shape)}")
        homogeneous = torch.nn.functional.pad(points, (0, 1), value=1.0)
        mvp = self.mvp.to(points.dtype)
        return torch.einsum("bij,bvj->bvi", mvp, homogeneous.expand(len(self), -1, -1))

    def world_to_camera_rotation(self) -> torch.Tensor:
        """``[B, 3, 3]``: rotates world directions (e.g. normals) into camera space."""
        return self.view[:, :3, :3]


def _as_1d(value: ScalarOrTensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.dim() > 1:
        raise IdtoError(f"{name} must be a number or a 1-D sequence, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise IdtoError(f"{name} must be finite, got {value!r}")
    return t.reshape(-1)


def perspective(fov_deg: torch.Tensor, aspect: float, near: float, far: float) -> torch.Tensor:
    """OpenGL perspective matrices ``[B, 4, 4]`` for vertical fields of view ``[B]`` in degrees."""
    f = 1.0 / torch.tan(torch.deg2rad(fov_deg) / 2)
    proj = torch.zeros(fov_deg.shape[0], 4, 4, dtype=fov_deg.dtype, device=fov_deg.device)
    proj[:, 0, 0] = f / aspect
    proj[:, 1, 1] = f
    proj[:, 2, 2] = -(far + near) / (far - near)
    proj[:, 2, 3] = -2.0 * far * near / (far - near)
    proj[:, 3, 2] = -1.0
    return proj


def orbit_camera(
    elevation_deg: ScalarOrTensor,
    azimuth_deg: ScalarOrTensor,
    radius: ScalarOrTensor,
    fov_deg: ScalarOrTensor,
    near: float = 0.1,
    far: float = 100.0,
    aspect: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    target: Sequence[Number] = (0.0, 0.0, 0.0),
) -> Camera:
    """Cameras on a sphere around ``target`` (default the origin), looking at it with +Y up.

    Arguments are numbers or 1-D sequences/tensors, broadcast against each other. ``aspect``
    is width / height of the images these cameras will render. ``target`` (one world point for all) lets
    narrow-FOV cameras frame a part of the head, e.g. the face, instead of its centre.
    """
    el, az, r, fov = (
        _as_1d(v, n)
        for v, n in ((elevation_deg, "elevation_deg"), (azimuth_deg, "azimuth_deg"),
                     (radius, "radius"), (fov_deg, "fov_deg"))
    )
    try:
        el, az, r, fov = torch.broadcast_tensors(el, az, r, fov)
    except RuntimeError as exc:
        raise IdtoError(f"camera parameters have incompatible lengths: {exc}") from None
    if (r <= 0).any():
        raise IdtoError(f"camera radius must be > 0, got {r.tolist()}")
    if ((fov <= 0) | (fov >= 180)).any():
        raise IdtoError(f"fov_deg must be in (0, 180), got {fov.tolist()}")
    if not 0 < near < far:
        raise IdtoError(f"need 0 < near < far, got near={near}, far={far}")
    if not aspect > 0:
        raise IdtoError(f"aspect must be > 0, got {aspect}")
    centre = _as_1d(target, "target")
    if centre.shape[0] != 3:
        raise IdtoError(f"target must be one (x, y, z) point, got {target!r}")

    e, a = torch.deg2rad(el), torch.deg2rad(az)
    # Camera axes in world space, written in closed form (the derivatives of the orbit
    # position) rather than by a look-at cross product, so elevation +-90 is not degenerate.
    back = torch.stack([torch.cos(e) * torch.sin(a), torch.sin(e), torch.cos(e) * torch.cos(a)], -1)
    right = torch.stack([torch.cos(a), torch.zeros_like(a), -torch.sin(a)], -1)
    up = torch.stack([-torch.sin(e) * torch.sin(a), torch.cos(e), -torch.sin(e) * torch.cos(a)], -1)
    eye = back * r[:, None] + centre

    view = torch.zeros(el.shape[0], 4, 4, dtype=torch.float64)
    view[:, :3, :3] = torch.stack([right, up, back], dim=1)
    view[:, :3, 3] = -torch.einsum("bij,bj->bi", view[:, :3, :3], eye)
    view[:, 3, 3] = 1.0

    cam = Camera(
        view=view, proj=perspective(fov, aspect, near, far), eye=eye,
        elevation_deg=el, azimuth_deg=az, radius=r, fov_deg=fov,
    )
    cam = Camera(**{f.name: getattr(cam, f.name).to(dtype) for f in fields(cam)})
    return cam.to(device) if device is not None else cam


def _check_range(rng: Sequence[Number], name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in rng)
    except (TypeError, ValueError):
        raise IdtoError(f"{name} must be a (low, high) pair, got {rng!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise IdtoError(f"{name} must be a finite (low, high) pair with low <= high, got {rng!r}")
    return lo, hi


def sample_orbit_cameras(
    n: int,
    elevation_range: Sequence[Number],
    azimuth_range: Sequence[Number],
    radius_range: Sequence[Number],
    fov_range: Sequence[Number],
    generator: torch.Generator | None = None,
    near: float = 0.1,
    far: float = 100.0,
    aspect: float = 1.0,
    device: torch.device | str | None = None,
    target: Sequence[Number] = (0.0, 0.0, 0.0),
) -> Camera:
    """``n`` orbit cameras around ``target``, each parameter uniform in its (degrees) range; reproducible under
    ``generator``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise IdtoError(f"number of cameras must be a positive integer, got {n!r}")
    ranges = [
        _check_range(elevation_range, "elevation_range"),
        _check_range(azimuth_range, "azimuth_range"),
        _check_range(radius_range, "radius_range"),
        _check_range(fov_range, "fov_range"),
    ]
    if ranges[2][0] <= 0:
        raise IdtoError(f"radius_range must be > 0, got {radius_range!r}")
    if ranges[3][0] <= 0 or ranges[3][1] >= 180:
        raise IdtoError(f"fov_range must lie inside (0, 180) degrees, got {fov_range!r}")
    # Draw on the CPU in float64 so a seed gives the same cameras on every device.
    u = torch.rand(4, n, generator=generator, dtype=torch.float64)
    el, az, r, fov = (lo + (hi - lo) * u[i] for i, (lo, hi) in enumerate(ranges))
    return orbit_camera(el, az, r, fov, near=near, far=far, aspect=aspect, device=device, target=target)


def view_word(azimuth_deg: ScalarOrTensor) -> list[str]:
    """The prompt's view word per azimuth: "front" (|az| < 45), "back" (|az| > 135), else "side"."""
    az = _as_1d(azimuth_deg, "azimuth_deg")
    wrapped = torch.remainder(az + 180.0, 360.0) - 180.0  # [-180, 180)
    wrapped = torch.where(wrapped == -180.0, torch.full_like(wrapped, 180.0), wrapped)
    words = []
    for a in wrapped.abs().tolist():
        words.append("front" if a < 45 else "back" if a > 135 else "side")
    return words
