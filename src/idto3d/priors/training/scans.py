"""Loading textured head scans into our head frame.

A scan is one textured triangle mesh of a head (``.ply``, ``.obj``, ``.glb``/``.gltf`` or ``.off``)
with per-vertex colours or a UV texture image. ``load_scan`` rotates it so its ``up`` axis becomes +Y
and its ``forward`` axis (the way the face looks) +Z; the defaults assume FLAME's axes, which NPHM
scans share. It is then centred on its bounding box and scaled so its largest extent is
``TEMPLATE_HEIGHT`` (it fits ``[-0.8, 0.8]^3``), so the scan's units do not matter. Positions split
at UV seams are merged and inward-facing scans are flipped, so normal maps come out smooth and the
right way round.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from idto3d.core.errors import IdtoError

AXES = ("+x", "-x", "+y", "-y", "+z", "-z")


class DatasetBuildError(IdtoError):
    """Scans, metadata or identities cannot make a training set."""


@dataclass
class ScanSurface:
    """A scan in the head frame: shared positions for the geometry, per-corner colour data for albedo."""

    vertices: torch.Tensor  # [V, 3] merged positions, normalised
    faces: torch.Tensor  # [F, 3] into vertices
    attribute_faces: torch.Tensor  # [F, 3] into the colour/uv rows
    vertex_colors: torch.Tensor | None  # [Va, 3] in [0, 1]
    uv: torch.Tensor | None  # [Va, 2]
    texture: torch.Tensor | None  # [Ht, Wt, 3] in [0, 1]

    def to(self, device: torch.device | str) -> "ScanSurface":
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return ScanSurface(mv(self.vertices), mv(self.faces), mv(self.attribute_faces), mv(self.vertex_colors),
                           mv(self.uv), mv(self.texture))

    @property
    def has_color(self) -> bool:
        return self.vertex_colors is not None or self.texture is not None


def axis_rotation(up: str = "+y", forward: str = "+z") -> np.ndarray:
    """The 3x3 rotation taking the scan's ``up`` axis to +Y and its ``forward`` axis to +Z."""
    for name, value in (("up", up), ("forward", forward)):
        if value not in AXES:
            raise DatasetBuildError(f"{name} axis must be one of {', '.join(AXES)}, got {value!r}")
    vec = {a: np.eye(3)[[0, 0, 1, 1, 2, 2][i]] * (1 if a[0] == "+" else -1) for i, a in enumerate(AXES)}
    y, z = vec[up], vec[forward]
    if abs(float(y @ z)) > 0.5:
        raise DatasetBuildError(f"up ({up}) and forward ({forward}) must be different, perpendicular axes")
    return np.stack([np.cross(y, z), y, z])  # rows: where new x, y, z come from


def _texture_image(visual: object) -> tuple[object | None, np.ndarray]:
    material = getattr(visual, "material", None)
    image = getattr(material, "image", None)
    factor = np.ones(3)
    if image is None:
        image = getattr(material, "baseColorTexture", None)
        base = getattr(material, "baseColorFactor", None)
        if base is not None:
            base = np.asarray(base, dtype=np.float64)[:3]
            factor = base / 255.0 if base.max() > 1.0 else base
    return image, factor


def load_scan(path: str | Path, up: str = "+y", forward: str = "+z", max_texture_size: int = 2048) -> ScanSurface:
    """Read a scan with its vertex colours or UV texture and normalise it into the head frame."""
    import trimesh
    from PIL import Image

    from idto3d.geometry.template import TEMPLATE_HEIGHT

    path = Path(path)
    try:
        loaded = trimesh.load(path, process=False)
    except Exception as exc:  # noqa: BLE001 - every parser failure means the same thing to a user
        raise DatasetBuildError(f"could not read scan {path}: {str(exc).splitlines()[0][:200] if str(exc) else exc!r}")
    if isinstance(loaded, trimesh.Scene):
        parts = [g for g in loaded.dump(concatenate=False) if isinstance(g, trimesh.Trimesh) and len(g.faces)]
        if not parts:
            raise DatasetBuildError(f"scan {path} contains no triangle mesh")
        loaded = parts[0] if len(parts) == 1 else trimesh.util.concatenate(parts)
    if not isinstance(loaded, trimesh.Trimesh) or len(loaded.faces) == 0:
        raise DatasetBuildError(f"scan {path} is not a triangle mesh (a point cloud or empty file?)")

    v = np.asarray(loaded.vertices, dtype=np.float64)
    f = np.asarray(loaded.faces, dtype=np.int64)
    if not np.isfinite(v).all():
        raise DatasetBuildError(f"scan {path} has NaN or infinite vertex coordinates")

    colors = uv = texture = None
    visual = loaded.visual
    if visual.kind == "texture" and getattr(visual, "uv", None) is not None:
        image, factor = _texture_image(visual)
        if image is not None:
            uv = torch.from_numpy(np.asarray(visual.uv, dtype=np.float32)[:, :2].copy())
            img = image.convert("RGB")
            if max(img.size) > max_texture_size:
                # Box-filtered downsizing doubles as the prefilter bilinear lookups lack.
                s = max_texture_size / max(img.size)
                img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.BOX)
            tex = np.asarray(img, dtype=np.float32) / 255.0 * factor.astype(np.float32)
            texture = torch.from_numpy(np.ascontiguousarray(tex))
    elif visual.kind in ("vertex", "face"):
        # Face colours are spread to vertices by trimesh (averaged).
        colors = torch.from_numpy(np.asarray(visual.vertex_colors, dtype=np.float32)[:, :3] / 255.0)

    # Positions split at UV seams are merged, so smooth normals do not crease there.
    merged, inverse = np.unique(v, axis=0, return_inverse=True)
    pos_faces = inverse.reshape(-1)[f]
    merged = merged @ axis_rotation(up, forward).T
    lo, hi = merged.min(0), merged.max(0)
    extent = float((hi - lo).max())
    if not extent > 0:
        raise DatasetBuildError(f"scan {path} has zero size")
    merged = (merged - 0.5 * (lo + hi)) * (TEMPLATE_HEIGHT / extent)
    # Scans are open at the neck but still enclose a positive volume seen from their centroid
    # when their faces point outward; flip inward-facing scans so normal maps are not inverted.
    c = merged.mean(0)
    a, b, d = (merged[pos_faces[:, i]] - c for i in range(3))
    if np.einsum("ij,ij->i", a, np.cross(b, d)).sum() < 0:
        pos_faces, f = pos_faces[:, [0, 2, 1]], f[:, [0, 2, 1]]
    return ScanSurface(
        vertices=torch.from_numpy(merged.astype(np.float32)),
        faces=torch.from_numpy(np.ascontiguousarray(pos_faces)),
        attribute_faces=torch.from_numpy(np.ascontiguousarray(f)),
        vertex_colors=colors, uv=uv, texture=texture,
    )


__all__ = ["AXES", "DatasetBuildError", "ScanSurface", "axis_rotation", "load_scan"]
