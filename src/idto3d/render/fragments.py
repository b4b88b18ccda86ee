"""What a rasteriser returns: per-pixel visible triangle, barycentrics and depth."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from idto3d.core.errors import IdtoError


@dataclass
class Fragments:
    """Rasterisation result for a batch of ``B`` images of ``H x W`` pixels, row 0 at the top.

    ``triangle_id`` is int64 ``[B, H, W]`` (-1 on background); ``bary`` ``[B, H, W, 3]`` are
    perspective-correct barycentrics of the triangle's vertices 0, 1, 2 (zeros on background),
    differentiable w.r.t. the clip-space vertex positions; ``depth`` ``[B, H, W]`` is NDC z/w
    (+inf on background). ``pixels`` is a backend's private, compact form of the same data
    (the torch backend: flat pixel index, batch index, face index and barycentrics of the
    covered pixels only; the nvdiffrast backend: its raw ``rast`` tensor, bottom row first).
    """

    triangle_id: torch.Tensor
    bary: torch.Tensor
    depth: torch.Tensor
    pixels: Any = None

    @property
    def mask(self) -> torch.Tensor:
        """Covered pixels, bool ``[B, H, W]``."""
        return self.triangle_id >= 0

    @property
    def resolution(self) -> tuple[int, int]:
        return int(self.triangle_id.shape[1]), int(self.triangle_id.shape[2])

    @property
    def batch_size(self) -> int:
        return int(self.triangle_id.shape[0])


def parse_resolution(resolution: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``256`` or ``(H, W)`` -> ``(H, W)``, rejecting anything that is not two positive ints."""
    if isinstance(resolution, bool):
        raise IdtoError(f"resolution must be an int or (height, width), got {resolution!r}")
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    try:
        h, w = resolution
    except (TypeError, ValueError):
        raise IdtoError(f"resolution must be an int or (height, width), got {resolution!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w)):
        raise IdtoError(f"resolution must be positive integers, got {resolution!r}")
    if h * w > 8192 * 8192:
        raise IdtoError(f"resolution {h}x{w} is too large (at most 8192x8192 pixels)")
    return h, w


def batched_clip(clip_vertices: torch.Tensor) -> torch.Tensor:
    """``[V, 4]`` or ``[B, V, 4]`` -> ``[B, V, 4]``."""
    if clip_vertices.dim() == 2:
        clip_vertices = clip_vertices.unsqueeze(0)
    if clip_vertices.dim() != 3 or clip_vertices.shape[-1] != 4:
        raise IdtoError(
            f"clip-space vertices must be [V, 4] or [B, V, 4], got {tuple(clip_vertices.shape)}"
        )
    if not clip_vertices.is_floating_point():
        raise IdtoError(f"clip-space vertices must be floating point, got {clip_vertices.dtype}")
    return clip_vertices


def checked_faces(faces: torch.Tensor, num_vertices: int) -> torch.Tensor:
    """Faces as int64 ``[F, 3]`` with every index inside ``[0, num_vertices)``."""
    if faces.dim() != 2 or faces.shape[-1] != 3:
        raise IdtoError(f"faces must be [F, 3], got {tuple(faces.shape)}")
    if faces.is_floating_point():
        raise IdtoError(f"faces must be integer indices, got {faces.dtype}")
    faces = faces.long()
    # Bounds are checked for host meshes only: reading min/max of a GPU tensor would make the host wait for
    # the device at every render (an out-of-range index there fails in the indexing kernel instead).
    if faces.numel() and faces.device.type == "cpu" and (int(faces.min()) < 0 or int(faces.max()) >= num_vertices):
        raise IdtoError(
            f"face indices must be in [0, {num_vertices}), got [{int(faces.min())}, {int(faces.max())}]"
        )
    return faces
