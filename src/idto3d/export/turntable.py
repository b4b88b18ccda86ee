"""Turntables of exported heads: PBR renders under the fixed studio lighting, as a PNG grid and an MP4.

Frames are rendered with ``render_pseudo_albedo`` (full GGX material, the texture stage's exposure rule),
so a turntable shows exactly what the texture stage optimised, lit by ``studio_envmap`` so every
turntable is lit the same way. Cameras orbit the origin (exported heads are centred there), azimuth 0
(the front, on +Z) first, turning toward +X. Tangent-space normal maps are not rendered (the shading
uses the mesh's smooth normals).

The MP4 needs an ``ffmpeg`` executable: the system one, else the static build shipped by the
``imageio-ffmpeg`` package (``pip install idto3d[video]``); without either only the PNG is written.
"""

from __future__ import annotations

import functools
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from idto3d.core.atomic import atomic_write
from idto3d.core.errors import IdtoError
from idto3d.export.maps import PBRMaps
from idto3d.texture.uv_atlas import UVMesh
from idto3d.render.camera import orbit_camera
from idto3d.render.envmap import EnvironmentMap, studio_envmap
from idto3d.render.pseudo_albedo import render_pseudo_albedo

GRID_COLUMNS = 6  # the PNG puts at most this many frames per row
DEFAULT_RADIUS = 3.0  # as the normal previews: frames the built-in head (inside [-0.85, 0.85]^3)
DEFAULT_FOV = 40.0
_BATCH_PIXELS = 256 * 256 * 4  # views per render batch = this / pixels per view (at least 1)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@functools.lru_cache(maxsize=1)
def _studio() -> EnvironmentMap:
    # One map object, so its prefiltered lighting (cached per object) is computed once per process.
    return studio_envmap()


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def camera_radius(vertices: np.ndarray, fov_deg: float = DEFAULT_FOV) -> float:
    """The orbit radius: ``DEFAULT_RADIUS``, or farther when the mesh's bounding sphere about the origin
    would not fit the field of view with a 5% margin (so heads of the usual size share one framing)."""
    extent = float(np.linalg.norm(vertices, axis=1).max()) if len(vertices) else 0.0
    fit = 1.05 * extent / math.sin(math.radians(fov_deg) / 2)
    return max(DEFAULT_RADIUS, fit)


def turntable_frames(
    uv_mesh: UVMesh,
    maps: PBRMaps,
    n_views: int = 12,
    resolution: int = 256,
    elevation: float = 10.0,
    env: EnvironmentMap | None = None,
    background: float = 1.0,
    *,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """uint8 ``[n_views, resolution, resolution, 3]`` renders at azimuths ``0, 360/n, ...`` (front first)
    under ``env`` (default: ``studio_envmap()``) over an sRGB grey ``background``."""
    if isinstance(n_views, bool) or not isinstance(n_views, int) or n_views < 1:
        raise IdtoError(f"a turntable needs a positive whole number of views, got {n_views!r}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or not 8 <= resolution <= 4096:
        raise IdtoError(f"turntable resolution must be a whole number of pixels in [8, 4096], got {resolution!r}")
    if not math.isfinite(float(elevation)) or not -89.0 <= float(elevation) <= 89.0:
        raise IdtoError(f"turntable elevation must be in [-89, 89] degrees, got {elevation!r}")
    if not 0.0 <= float(background) <= 1.0:
        raise IdtoError(f"turntable background must be a grey level in [0, 1], got {background!r}")
    dev = torch.device(device) if device is not None else _default_device()
    env = env if env is not None else _studio()
    if dev.type != "cpu":
        env = env.to(dev)

    mesh, uv, attribute_faces = uv_mesh.render_inputs(dev)
    albedo = torch.from_numpy(np.ascontiguousarray(maps.albedo)).to(dev)
    roughness = torch.from_numpy(np.ascontiguousarray(maps.roughness)).reshape(*maps.roughness.shape[:2], 1).to(dev)
    metallic = torch.from_numpy(np.ascontiguousarray(maps.metallic)).reshape(*maps.metallic.shape[:2], 1).to(dev)

    azimuth = torch.arange(n_views, dtype=torch.float64) * (360.0 / n_views)
    radius = camera_radius(uv_mesh.vertices)
    cameras = orbit_camera(float(elevation), azimuth, radius, DEFAULT_FOV, device=dev)
    per_batch = max(1, _BATCH_PIXELS // (resolution * resolution))
    frames = np.empty((n_views, resolution, resolution, 3), dtype=np.uint8)
    with torch.no_grad():
        for start in range(0, n_views, per_batch):
            stop = min(start + per_batch, n_views)
            out = render_pseudo_albedo(mesh, cameras[start:stop], resolution, albedo, roughness, metallic, env,
                                       uv=uv, attribute_faces=attribute_faces, background=float(background))
            frames[start:stop] = (out.image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()
    return frames


def find_ffmpeg() -> str | None:
    """The ``ffmpeg`` on PATH, else imageio-ffmpeg's bundled binary, else None."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg
    except ImportError:
        return None
    try:
        return imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError:  # the package is installed but its binary is missing for this platform
        return None


def frame_grid(frames: np.ndarray, columns: int = GRID_COLUMNS, fill: int = 255) -> np.ndarray:
    """Frames ``[N, H, W, 3]`` laid out left to right, top to bottom: one row when ``N <= columns``, else
    ``ceil(N / columns)`` rows of equal length (12 views: 2 rows of 6); spare cells are ``fill``."""
    n, h, w, c = frames.shape
    rows = math.ceil(n / columns)
    cols = math.ceil(n / rows)
    grid = np.full((rows * h, cols * w, c), fill, dtype=np.uint8)
    for i, frame in enumerate(frames):
        r, k = divmod(i, cols)
        grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = frame
    return grid


def _check_frames(frames: np.ndarray) -> np.ndarray:
    a = np.asarray(frames)
    if a.ndim != 4 or a.shape[-1] != 3 or min(a.shape[:3]) < 1:
        raise IdtoError(f"turntable frames must be a non-empty [N, H, W, 3] array, got shape {a.shape}")
    if a.dtype != np.uint8:
        raise IdtoError(f"turntable frames must be uint8, got {a.dtype}")
    return a


def _write_mp4(ffmpeg: str, frames: np.ndarray, path: Path, fps: int) -> None:
    # yuv420p (what every player decodes) halves chroma resolution, so H.264 needs even sizes.
    n, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    h, w = frames.shape[1:3]
    cmd = [ffmpeg, "-hide_banner", "-loglevel", "error", "-y",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "-",
           "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-movflags", "+faststart", "-f", "mp4"]

    def encode(tmp: Path) -> None:
        try:
            proc = subprocess.run([*cmd, str(tmp)], input=np.ascontiguousarray(frames).tobytes(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
        except OSError as exc:
            raise IdtoError(f"cannot run ffmpeg ({ffmpeg}): {exc.strerror or exc}") from None
        if proc.returncode != 0 or tmp.stat().st_size == 0:
            tail = proc.stderr.decode("utf-8", errors="replace").strip().splitlines()[-5:]
            detail = " | ".join(tail) if tail else "no message"
            raise IdtoError(f"ffmpeg ({ffmpeg}) failed to encode {path.name} (exit {proc.returncode}): {detail}")

    atomic_write(path, encode)


def save_turntable(frames: np.ndarray, png_path: str | Path, mp4_path: str | Path | None = None,
                   fps: int = 12) -> dict[str, Path]:
    """Write the PNG grid (see ``frame_grid``) and, when ``mp4_path`` is given and ffmpeg is found, an
    H.264 MP4 (yuv420p) looping once through the frames; both atomically. Returns ``{"png": ..,
    "mp4": ..}`` for the files actually written (no ``"mp4"`` when ffmpeg is missing). Raises
    ``IdtoError`` when ffmpeg fails, leaving no MP4 behind."""
    a = _check_frames(frames)
    if isinstance(fps, bool) or not isinstance(fps, int) or not 1 <= fps <= 240:
        raise IdtoError(f"turntable fps must be a whole number in [1, 240], got {fps!r}")
    grid = frame_grid(a)
    written = {"png": atomic_write(png_path, lambda p: Image.fromarray(grid).save(p, format="PNG"))}
    if mp4_path is not None:
        ffmpeg = find_ffmpeg()
        if ffmpeg is not None:
            _write_mp4(ffmpeg, a, Path(mp4_path), fps)
            written["mp4"] = Path(mp4_path)
    return written


def write_turntable(out_dir: str | Path, name: str, uv_mesh: UVMesh, maps: PBRMaps, n_views: int = 12,
                    resolution: int = 256, video: bool = True) -> dict[str, Path]:
    """``out_dir/NAME_turntable.png`` (+ ``NAME_turntable.mp4`` when ``video`` and ffmpeg is found)."""
    if not _NAME.match(name):
        raise IdtoError(f"expression name {name!r} is not a safe file name; use letters, digits, '_', '-' or '.'")
    out_dir = Path(out_dir)
    frames = turntable_frames(uv_mesh, maps, n_views, resolution)
    return save_turntable(frames, out_dir / f"{name}_turntable.png",
                          out_dir / f"{name}_turntable.mp4" if video else None)
