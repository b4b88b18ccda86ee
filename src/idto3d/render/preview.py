"""Preview images people look at: normal-map turntable strips saved as PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from idto3d.core.atomic import atomic_write
from idto3d.render.camera import orbit_camera
from idto3d.render.mesh import Mesh
from idto3d.render.normals import render_normal_map


def normal_turntable(mesh: Mesh, n_views: int = 4, elevation: float = 10.0, resolution: int = 256,
                     radius: float = 3.0, fov: float = 40.0) -> np.ndarray:
    """``[H, n_views*W, 3]`` uint8 strip of camera-space normal maps, azimuth 0 (front) first."""
    az = torch.linspace(0.0, 360.0, n_views + 1)[:-1]
    az = torch.where(az > 180.0, az - 360.0, az)
    cams = orbit_camera(torch.full_like(az, elevation), az, torch.full_like(az, radius), torch.full_like(az, fov))
    with torch.no_grad():
        img = render_normal_map(mesh.detach(), cams, resolution).image  # [B,H,W,3]
    strip = torch.cat(list(img), dim=1)
    return (strip.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


def save_png(image: np.ndarray, path: str | Path) -> Path:
    return atomic_write(path, lambda p: Image.fromarray(image).save(p, format="PNG"))


def save_turntable_normals(mesh: Mesh, path: str | Path, n_views: int = 4, elevation: float = 10.0,
                           resolution: int = 256) -> Path:
    return save_png(normal_turntable(mesh, n_views, elevation, resolution), path)
