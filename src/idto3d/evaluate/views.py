"""The paper's evaluation cameras (section 4): elevation in [-15, +15] and azimuth in [-65, +65] degrees.

Views are ordered elevation-major (all azimuths of the lowest elevation first), so ``N = E x A`` renders
lay out as an ``E``-row contact sheet. Framing, lighting and material are the turntables' (``export.turntable``):
orbit radius ``camera_radius`` (3 units, farther for a bigger head) at a 40 degree field of view, the fixed
studio environment at the texture stage's exposure, the full GGX material, on white. Camera conventions
are the README's: azimuth 0 is the front, positive azimuth moves the camera toward +X (the head's left),
positive elevation looks down from above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from idto3d.core.errors import IdtoError
from idto3d.evaluate.assets import ExportedHead
from idto3d.export.turntable import DEFAULT_FOV, _studio, camera_radius
from idto3d.render.camera import Camera, orbit_camera
from idto3d.render.envmap import EnvironmentMap
from idto3d.render.normals import render_normal_map
from idto3d.render.pseudo_albedo import render_pseudo_albedo

PAPER_ELEVATION = (-15.0, 15.0)
PAPER_AZIMUTH = (-65.0, 65.0)
_BATCH_PIXELS = 256 * 256 * 4  # views per render batch = this / pixels per view (at least 1)


@dataclass(frozen=True)
class CameraGrid:
    """Evaluation cameras: every elevation with every azimuth (degrees), at ``fov`` degrees."""

    elevations: tuple[float, ...]
    azimuths: tuple[float, ...]
    fov: float = DEFAULT_FOV

    @property
    def views(self) -> list[tuple[float, float]]:
        """``(elevation, azimuth)`` per view, elevation-major."""
        return [(e, a) for e in self.elevations for a in self.azimuths]

    def __len__(self) -> int:
        return len(self.elevations) * len(self.azimuths)

    def cameras(self, radius: float, device: torch.device | str = "cpu") -> Camera:
        el, az = zip(*self.views)
        return orbit_camera(torch.tensor(el, dtype=torch.float64), torch.tensor(az, dtype=torch.float64),
                            radius, self.fov, device=device)


def _count(n: int, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 64:
        raise IdtoError(f"the camera grid needs a whole number of {what} in [1, 64], got {n!r}")
    return n


def _span(lo: float, hi: float, n: int) -> tuple[float, ...]:
    # One view sits in the middle of the range (the front for the paper's symmetric ranges).
    values = [0.5 * (lo + hi)] if n == 1 else np.linspace(lo, hi, n).tolist()
    return tuple(round(float(v), 6) for v in values)


def camera_grid(elevations: int = 3, azimuths: int = 7, elevation_range: tuple[float, float] = PAPER_ELEVATION,
                azimuth_range: tuple[float, float] = PAPER_AZIMUTH, fov: float = DEFAULT_FOV) -> CameraGrid:
    """Evenly spaced views over the ranges (ends included; one value = the range's middle). The default
    3 x 7 grid is elevations -15, 0, 15 by azimuths -65 to 65 in steps of 21.7 degrees; odd counts include
    the front view (0, 0)."""
    for (lo, hi), what, bound in ((elevation_range, "elevation", 89.0), (azimuth_range, "azimuth", 180.0)):
        if not (math.isfinite(lo) and math.isfinite(hi) and -bound <= lo <= hi <= bound):
            raise IdtoError(f"the {what} range must be increasing degrees within [-{bound:g}, {bound:g}], "
                            f"got [{lo}, {hi}]")
    if not 0.0 < fov < 180.0:
        raise IdtoError(f"the field of view must be in (0, 180) degrees, got {fov}")
    return CameraGrid(_span(*elevation_range, _count(elevations, "elevations")),
                      _span(*azimuth_range, _count(azimuths, "azimuths")), float(fov))


def check_resolution(resolution: int) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or not 32 <= resolution <= 4096:
        raise IdtoError(f"the render resolution must be a whole number of pixels in [32, 4096], got {resolution!r}")
    return resolution


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


@torch.no_grad()
def render_grid(head: ExportedHead, grid: CameraGrid, resolution: int = 256, *, env: EnvironmentMap | None = None,
                device: torch.device | str | None = None) -> np.ndarray:
    """uint8 ``[len(grid), resolution, resolution, 3]``: the head under the studio lighting (or ``env``), full
    material, white background; views in ``grid.views`` order."""
    resolution = check_resolution(resolution)
    dev = torch.device(device) if device is not None else _default_device()
    env = env if env is not None else _studio()
    if dev.type != "cpu":
        env = env.to(dev)
    mesh = head.mesh.to(dev)
    maps = head.maps
    albedo = torch.from_numpy(np.ascontiguousarray(maps.albedo)).to(dev)
    roughness = torch.from_numpy(np.ascontiguousarray(maps.roughness))[..., None].to(dev)
    metallic = torch.from_numpy(np.ascontiguousarray(maps.metallic))[..., None].to(dev)
    uv, attribute_faces = head.uv.to(dev), head.attribute_faces.to(dev)
    cameras = grid.cameras(camera_radius(head.mesh.vertices.numpy(), grid.fov), dev)
    out = np.empty((len(grid), resolution, resolution, 3), dtype=np.uint8)
    step = max(1, _BATCH_PIXELS // (resolution * resolution))
    for start in range(0, len(grid), step):
        stop = min(start + step, len(grid))
        img = render_pseudo_albedo(mesh, cameras[start:stop], resolution, albedo, roughness, metallic, env,
                                   uv=uv, attribute_faces=attribute_faces, background=1.0).image
        out[start:stop] = _to_uint8(img)
    return out


@torch.no_grad()
def render_normal_grid(head: ExportedHead, grid: CameraGrid, resolution: int = 256, *,
                       device: torch.device | str | None = None) -> np.ndarray:
    """uint8 ``[len(grid), resolution, resolution, 3]`` camera-space normal maps (README convention) on white:
    the geometry FID's images."""
    resolution = check_resolution(resolution)
    dev = torch.device(device) if device is not None else _default_device()
    mesh = head.mesh.to(dev)
    cameras = grid.cameras(camera_radius(head.mesh.vertices.numpy(), grid.fov), dev)
    out = np.empty((len(grid), resolution, resolution, 3), dtype=np.uint8)
    step = max(1, _BATCH_PIXELS // (resolution * resolution))
    for start in range(0, len(grid), step):
        stop = min(start + step, len(grid))
        out[start:stop] = _to_uint8(render_normal_map(mesh, cameras[start:stop], resolution, background=1.0).image)
    return out
