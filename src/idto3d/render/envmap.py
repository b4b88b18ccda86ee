"""HDR environment maps: Radiance ``.hdr`` / OpenEXR loading, Y rotation, and a procedural sky.

Convention (equirectangular, linear RGB radiance, float32 ``[H, W, 3]``, row 0 at the top):
world +Y is up (row 0 is the zenith, the last row the nadir), and a unit direction
``d = (x, y, z)`` maps to

    u = 0.5 + atan2(x, z) / (2 pi)        v = acos(y) / pi

so the image centre ``u = 0.5`` is **+Z** (where the head faces and the front camera sits),
``u = 0.75`` is +X, and the left/right edges are -Z. Pixel ``(i, j)`` covers
``u in [j/W, (j+1)/W)``, ``v in [i/H, (i+1)/H)``.

``rotate_y(env, a)`` rotates the lighting by ``a`` degrees about +Y (right-handed: +Z turns
toward +X), which in this layout moves the content ``a / 360 * W`` columns to the right.
"""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from idto3d.core.atomic import atomic_write, atomic_write_bytes
from idto3d.core.errors import IdtoError

ENVMAP_SUFFIXES = (".hdr", ".exr")


class EnvMapError(IdtoError):
    """An environment map file or folder is missing, unreadable or corrupt."""


@dataclass(eq=False)  # identity hashing: prefiltered lighting is cached per map object
class EnvironmentMap:
    """Equirectangular linear RGB radiance ``[H, W, 3]`` (see the module docstring).

    ``base`` and ``rotation_deg`` record that this map is ``base`` rotated about +Y, so the
    (expensive) prefiltered lighting of ``base`` can be reused by rotating it instead.
    """

    radiance: torch.Tensor
    name: str = ""
    base: "EnvironmentMap | None" = None
    rotation_deg: float = 0.0

    def __post_init__(self) -> None:
        r = self.radiance
        if r.dim() != 3 or r.shape[-1] != 3 or r.shape[0] < 2 or r.shape[1] < 2:
            raise EnvMapError(f"an environment map must be [H, W, 3] with H, W >= 2, got {tuple(r.shape)}")
        if not r.is_floating_point():
            raise EnvMapError(f"environment map radiance must be floating point, got {r.dtype}")

    @property
    def height(self) -> int:
        return int(self.radiance.shape[0])

    @property
    def width(self) -> int:
        return int(self.radiance.shape[1])

    def to(self, device: torch.device | str) -> "EnvironmentMap":
        base = self.base.to(device) if self.base is not None else None
        return EnvironmentMap(self.radiance.to(device), self.name, base, self.rotation_deg)


# ---------------------------------------------------------------- directions <-> pixels

def pixel_directions(height: int, width: int, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Unit directions ``[H, W, 3]`` of the pixel centres of an ``H x W`` equirectangular map."""
    theta = (torch.arange(height, dtype=torch.float64) + 0.5) / height * math.pi
    phi = ((torch.arange(width, dtype=torch.float64) + 0.5) / width - 0.5) * 2 * math.pi
    t, p = torch.meshgrid(theta, phi, indexing="ij")
    d = torch.stack([torch.sin(t) * torch.sin(p), torch.cos(t), torch.sin(t) * torch.cos(p)], -1)
    return d.to(dtype=dtype, device=device)


def pixel_solid_angles(height: int, width: int, dtype: torch.dtype = torch.float32,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """Exact solid angle ``[H, 1]`` of each pixel row (they sum to 4 pi over the map)."""
    edges = torch.arange(height + 1, dtype=torch.float64) / height * math.pi
    rows = (torch.cos(edges[:-1]) - torch.cos(edges[1:])) * (2 * math.pi / width)
    return rows.unsqueeze(-1).to(dtype=dtype, device=device)


def direction_to_uv(dirs: torch.Tensor) -> torch.Tensor:
    """``[..., 3]`` directions (need not be unit) to ``[..., 2]`` (u, v) in [0, 1]."""
    x, y, z = dirs.unbind(-1)
    rxz2 = x * x + z * z
    # Guard the poles: atan2(0, 0) and sqrt(0) have NaN/inf gradients.
    at_pole = rxz2 < 1e-20
    z_safe = torch.where(at_pole, torch.ones_like(z), z)
    u = 0.5 + torch.atan2(x, z_safe) / (2 * math.pi)
    v = torch.atan2(torch.sqrt(rxz2.clamp(min=1e-20)), y) / math.pi
    return torch.stack([u, v], -1)


def sample_equirect(image: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample an equirectangular ``[H, W, C]`` image along ``[..., 3]`` directions.

    Wraps around in longitude, clamps at the poles; differentiable w.r.t. ``dirs``.
    """
    H, W, C = image.shape
    uv = direction_to_uv(dirs.to(image.dtype))
    flat = uv.reshape(1, 1, -1, 2)
    # One wrapped column on each side makes bilinear filtering seamless across u = 0 / 1.
    padded = torch.cat([image[:, -1:], image, image[:, :1]], 1).permute(2, 0, 1).unsqueeze(0)
    gx = (flat[..., 0] * W + 1) / (W + 2) * 2 - 1
    gy = flat[..., 1] * 2 - 1
    out = F.grid_sample(padded, torch.stack([gx, gy], -1), mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out[0, :, 0].transpose(0, 1).reshape(*dirs.shape[:-1], C)


# ---------------------------------------------------------------- rotation and resizing

def rotate_columns(image: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate an equirectangular ``[H, W, C]`` image about +Y: an exact roll when the shift is a
    whole number of columns, else periodic linear interpolation between two rolls."""
    W = image.shape[1]
    shift = (float(degrees) / 360.0 * W) % W
    k = math.floor(shift)
    frac = shift - k
    if frac < 1e-6 or frac > 1 - 1e-6:
        return torch.roll(image, shifts=int(round(shift)) % W, dims=1)
    return (1 - frac) * torch.roll(image, k, dims=1) + frac * torch.roll(image, k + 1, dims=1)


def rotate_y(env: EnvironmentMap, degrees: float) -> EnvironmentMap:
    """``env`` rotated by ``degrees`` about +Y (+Z turns toward +X); see ``rotate_columns``."""
    if not math.isfinite(float(degrees)):
        raise EnvMapError(f"rotation must be a finite number of degrees, got {degrees!r}")
    base = env.base if env.base is not None else env
    total = (env.rotation_deg + float(degrees)) % 360.0
    return EnvironmentMap(rotate_columns(env.radiance, degrees), env.name, base, total)


def resize_envmap(env: EnvironmentMap, height: int) -> EnvironmentMap:
    """Resample to ``height x 2*height`` (area average when shrinking, bilinear when growing)."""
    if height < 2:
        raise EnvMapError(f"environment map height must be >= 2, got {height}")
    if env.height == height and env.width == 2 * height:
        return env
    x = env.radiance.permute(2, 0, 1).unsqueeze(0)
    if height <= env.height:
        y = F.adaptive_avg_pool2d(x, (height, 2 * height))
    else:
        y = F.interpolate(x, size=(height, 2 * height), mode="bilinear", align_corners=False)
    return EnvironmentMap(y[0].permute(1, 2, 0).contiguous(), env.name)


# ---------------------------------------------------------------- Radiance .hdr

def _rgbe_to_float(rgbe: np.ndarray) -> np.ndarray:
    e = rgbe[..., 3].astype(np.int32)
    # stb_image / pfstools convention: value = mantissa * 2^(e - 136).
    scale = np.where(e > 0, np.ldexp(1.0, e - 136), 0.0).astype(np.float32)
    return rgbe[..., :3].astype(np.float32) * scale[..., None]


def _float_to_rgbe(rgb: np.ndarray) -> np.ndarray:
    m = rgb.max(-1)
    mant, exp = np.frexp(m)
    scale = np.where(m > 1e-32, mant * 256.0 / np.where(m > 1e-32, m, 1.0), 0.0)
    out = np.zeros(rgb.shape[:-1] + (4,), np.uint8)
    out[..., :3] = np.clip(np.rint(rgb * scale[..., None]), 0, 255).astype(np.uint8)
    out[..., 3] = np.where(m > 1e-32, exp + 128, 0).astype(np.uint8)
    return out


def _rle_channel(row: np.ndarray) -> bytes:
    """New-style RLE of one channel of one scanline: runs (>=3 equal bytes) and literal dumps."""
    out = bytearray()
    n, i = len(row), 0
    while i < n:
        j = i
        while j < n and j - i < 127 and row[j] == row[i]:
            j += 1
        if j - i >= 3:
            out += bytes((128 + j - i, int(row[i])))
            i = j
            continue
        start = i
        while i < n and i - start < 128:
            if i + 2 < n and row[i] == row[i + 1] == row[i + 2]:
                break
            i += 1
        out += bytes((i - start,)) + row[start:i].tobytes()
    return bytes(out)


def save_hdr(path: str | Path, radiance: torch.Tensor | np.ndarray, rle: bool = True) -> Path:
    """Write linear RGB ``[H, W, 3]`` as a Radiance ``.hdr`` (new-style RLE or flat scanlines)."""
    rgb = np.asarray(radiance.detach().cpu() if isinstance(radiance, torch.Tensor) else radiance,
                     dtype=np.float32)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise EnvMapError(f"save_hdr needs an [H, W, 3] image, got {rgb.shape}")
    if not np.isfinite(rgb).all():
        raise EnvMapError("save_hdr: the image has NaN or infinite values")
    H, W, _ = rgb.shape
    rgbe = _float_to_rgbe(np.maximum(rgb, 0))
    data = bytearray(f"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y {H} +X {W}\n".encode("ascii"))
    use_rle = rle and 8 <= W < 32768
    for y in range(H):
        if use_rle:
            data += bytes((2, 2, W >> 8, W & 255))
            for c in range(4):
                data += _rle_channel(rgbe[y, :, c])
        else:
            data += rgbe[y].tobytes()
    return atomic_write_bytes(path, bytes(data))


def _read_hdr(path: Path) -> np.ndarray:
    data = path.read_bytes()
    if not data:
        raise EnvMapError(f"{path}: the file is empty")
    if not (data.startswith(b"#?RADIANCE") or data.startswith(b"#?RGBE")):
        raise EnvMapError(f"{path}: not a Radiance HDR file (missing the '#?RADIANCE' signature)")
    header_end = data.find(b"\n\n")
    if header_end < 0:
        raise EnvMapError(f"{path}: corrupt Radiance header (no blank line ends it)")
    for line in data[:header_end].split(b"\n")[1:]:
        if line.startswith(b"FORMAT=") and line.strip() != b"FORMAT=32-bit_rle_rgbe":
            raise EnvMapError(f"{path}: unsupported HDR pixel format {line.decode(errors='replace')!r} "
                              "(only 32-bit_rle_rgbe is supported)")
    res_end = data.find(b"\n", header_end + 2)
    res_line = data[header_end + 2:res_end if res_end >= 0 else None].decode("ascii", errors="replace")
    m = re.fullmatch(r"\s*([-+])Y (\d+) \+X (\d+)\s*", res_line)
    if res_end < 0 or m is None:
        raise EnvMapError(f"{path}: corrupt or unsupported HDR resolution line {res_line[:40]!r} "
                          "(expected '-Y <height> +X <width>')")
    flip, H, W = m.group(1) == "+", int(m.group(2)), int(m.group(3))
    if H < 1 or W < 1:
        raise EnvMapError(f"{path}: HDR image has no pixels ({W}x{H})")
    buf = np.frombuffer(data, np.uint8, offset=res_end + 1)
    out = np.empty((H, W, 4), np.uint8)
    pos, n = 0, len(buf)
    truncated = EnvMapError(f"{path}: the HDR file is truncated or corrupt (pixel data ends early)")
    for y in range(H):
        if pos + 4 > n:
            raise truncated
        if 8 <= W < 32768 and buf[pos] == 2 and buf[pos + 1] == 2 and not buf[pos + 2] & 128:
            if (int(buf[pos + 2]) << 8 | int(buf[pos + 3])) != W:
                raise EnvMapError(f"{path}: corrupt HDR scanline {y} (RLE width does not match the image)")
            pos += 4
            for c in range(4):
                x = 0
                while x < W:
                    if pos >= n:
                        raise truncated
                    count = int(buf[pos])
                    if count > 128:  # a run of one byte
                        count -= 128
                        if pos + 1 >= n:
                            raise truncated
                        if x + count > W:
                            raise EnvMapError(f"{path}: corrupt HDR run-length data in scanline {y}")
                        out[y, x:x + count, c] = buf[pos + 1]
                        pos += 2
                    else:  # a literal dump
                        if count == 0 or x + count > W:
                            raise EnvMapError(f"{path}: corrupt HDR run-length data in scanline {y}")
                        if pos + 1 + count > n:
                            raise truncated
                        out[y, x:x + count, c] = buf[pos + 1:pos + 1 + count]
                        pos += 1 + count
                    x += count
        else:  # flat scanline (old-style RLE run markers are not supported)
            if pos + 4 * W > n:
                raise truncated
            out[y] = buf[pos:pos + 4 * W].reshape(W, 4)
            pos += 4 * W
    rgb = _rgbe_to_float(out)
    return rgb[::-1].copy() if flip else rgb


# ---------------------------------------------------------------- OpenEXR

def _read_exr(path: Path) -> np.ndarray:
    try:
        import OpenEXR
    except ImportError:
        raise EnvMapError(f"{path}: reading .exr needs the 'openexr' package (pip install openexr)") from None
    if path.stat().st_size == 0:
        raise EnvMapError(f"{path}: the file is empty")
    try:
        with OpenEXR.File(str(path), separate_channels=True) as f:
            channels = {k: np.asarray(v.pixels) for k, v in f.channels().items()}
    except Exception as exc:  # the binding raises bare RuntimeError/ValueError on bad files
        raise EnvMapError(f"{path}: not a readable OpenEXR file ({exc})") from None
    names = {k.split(".")[-1].upper(): k for k in channels}
    if {"R", "G", "B"} <= names.keys():
        rgb = np.stack([channels[names[c]] for c in "RGB"], -1)
    elif "Y" in names:
        rgb = np.repeat(channels[names["Y"]][..., None], 3, -1)
    else:
        raise EnvMapError(f"{path}: the EXR has no R, G, B (or Y) channels, found {sorted(channels)}")
    return rgb.astype(np.float32)


def save_exr(path: str | Path, radiance: torch.Tensor | np.ndarray) -> Path:
    """Write linear RGB ``[H, W, 3]`` as a float32 OpenEXR (ZIP compression)."""
    import OpenEXR

    rgb = np.ascontiguousarray(np.asarray(
        radiance.detach().cpu() if isinstance(radiance, torch.Tensor) else radiance, dtype=np.float32))
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}

    def write(tmp: Path) -> None:
        with OpenEXR.File(header, {"RGB": rgb}) as f:
            f.write(str(tmp))

    return atomic_write(path, write)


# ---------------------------------------------------------------- loading

def load_envmap(path: str | Path, height: int | None = None) -> EnvironmentMap:
    """Load a ``.hdr`` or ``.exr`` environment map, optionally resized to ``height x 2*height``."""
    p = Path(path)
    if not p.is_file():
        raise EnvMapError(f"environment map {p} does not exist or is not a file")
    suffix = p.suffix.lower()
    if suffix not in ENVMAP_SUFFIXES:
        raise EnvMapError(f"{p}: unsupported environment map type {suffix!r} (use .hdr or .exr)")
    try:
        rgb = _read_hdr(p) if suffix == ".hdr" else _read_exr(p)
    except OSError as exc:
        raise EnvMapError(f"cannot read environment map {p}: {exc.strerror or exc}") from None
    if not np.isfinite(rgb).all():
        raise EnvMapError(f"{p}: the environment map has NaN or infinite pixels")
    if rgb.shape[0] < 2 or rgb.shape[1] < 2:
        raise EnvMapError(f"{p}: environment map is too small ({rgb.shape[1]}x{rgb.shape[0]})")
    env = EnvironmentMap(torch.from_numpy(np.maximum(rgb, 0)).contiguous(), p.name)
    return resize_envmap(env, height) if height is not None else env


def load_envmap_folder(folder: str | Path) -> list[Path]:
    """The ``.hdr`` / ``.exr`` files directly inside ``folder``, sorted by name."""
    p = Path(folder)
    if not p.exists():
        raise EnvMapError(f"environment map folder {p} does not exist")
    if not p.is_dir():
        raise EnvMapError(f"environment map folder {p} is not a folder")
    try:
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in ENVMAP_SUFFIXES and f.is_file())
    except OSError as exc:
        raise EnvMapError(f"cannot read environment map folder {p}: {exc.strerror or exc}") from None
    if not files:
        raise EnvMapError(f"environment map folder {p} has no .hdr or .exr files "
                          "(leave the folder unset to use procedural skies)")
    unreadable = [f.name for f in files if not os.access(f, os.R_OK)]
    if unreadable:
        raise EnvMapError(f"environment maps in {p} are not readable: {', '.join(unreadable[:5])}")
    return files


# ---------------------------------------------------------------- procedural skies

_LUMA = torch.tensor([0.2126, 0.7152, 0.0722], dtype=torch.float64)


def blackbody_rgb(kelvin: float) -> torch.Tensor:
    """Linear-RGB colour of a blackbody at ``kelvin`` (Tanner Helland's fit), luminance 1."""
    t = min(max(float(kelvin), 1000.0), 40000.0) / 100.0
    r = 255.0 if t <= 66 else 329.698727446 * (t - 60) ** -0.1332047592
    g = 99.4708025861 * math.log(t) - 161.1195681661 if t <= 66 else 288.1221695283 * (t - 60) ** -0.0755148492
    b = 255.0 if t >= 66 else 0.0 if t <= 19 else 138.5177312231 * math.log(t - 10) - 305.0447927307
    srgb = torch.tensor([r, g, b], dtype=torch.float64).clamp(0, 255) / 255
    lin = srgb_to_linear(srgb)
    return lin / (lin @ _LUMA).clamp(min=1e-6)


def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x <= 0.04045, x / 12.92, ((x.clamp(min=0) + 0.055) / 1.055) ** 2.4)


def procedural_envmap(generator: torch.Generator | None = None, height: int = 64) -> EnvironmentMap:
    """A random outdoor-ish HDR sky: zenith->horizon gradient, a ground, 1-3 sun/area lights.

    Each light has a random direction (elevation -5..75 deg), angular radius (at least 1.5
    pixels, up to 20 deg: small ones are suns, big ones soft area lights), colour temperature
    (2500..9000 K) and irradiance (1..20x the sky's), so peak radiance is 1e2..1e4x the sky.
    All draws come from ``generator`` in a fixed order, on the CPU in float64.
    """
    if height < 4:
        raise EnvMapError(f"procedural environment map height must be >= 4, got {height}")
    g = generator

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))

    H, W = height, 2 * height
    d = pixel_directions(H, W, torch.float64)
    y = d[..., 1:2]
    sky_level = uniform(0.2, 1.5)
    zenith = blackbody_rgb(uniform(8000, 20000)) * sky_level
    horizon = blackbody_rgb(uniform(5500, 8000)) * sky_level * uniform(1.0, 2.0)
    ground = torch.tensor([uniform(0.2, 0.5), uniform(0.18, 0.4), uniform(0.12, 0.3)],
                          dtype=torch.float64) * sky_level * uniform(0.3, 1.0)
    t_sky = y.clamp(min=0) ** uniform(0.3, 0.8)
    sky = horizon * (1 - t_sky) + zenith * t_sky
    # A few degrees of smooth horizon so there is no aliased step.
    blend = ((y + 0.05) / 0.1).clamp(0, 1)
    rad = sky * blend + (horizon * 0.5 + ground * 0.5) * (1 - blend)
    rad = torch.where(y < -0.05, ground.expand_as(rad), rad)

    dw = pixel_solid_angles(H, W, torch.float64).unsqueeze(-1)  # [H, 1, 1]
    sky_irradiance = float((rad.mean(-1, keepdim=True) * d[..., 1:2].clamp(min=0) * dw).sum())
    min_radius = 1.5 * math.pi / H
    for _ in range(1 + int(torch.randint(0, 3, (), generator=g))):
        el, az = math.radians(uniform(-5, 75)), math.radians(uniform(0, 360))
        radius = math.exp(uniform(math.log(min_radius), math.log(max(math.radians(20), min_radius * 1.01))))
        colour = blackbody_rgb(uniform(2500, 9000))
        irradiance = sky_irradiance * uniform(1, 20)
        axis = torch.tensor([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)],
                            dtype=torch.float64)
        ang = torch.acos((d @ axis).clamp(-1, 1)).unsqueeze(-1)
        w = ((1.3 * radius - ang) / (0.6 * radius)).clamp(0, 1)
        w = w * w * (3 - 2 * w)  # smoothstep: a soft-edged disc
        # Scale the disc so it delivers ``irradiance`` at normal incidence, whatever its size.
        peak = irradiance / max(float((w * dw).sum()), 1e-12)
        rad = rad + w * peak * colour
    return EnvironmentMap(rad.to(torch.float32), "procedural")


_FILE_CACHE: OrderedDict[tuple[str, int | None], EnvironmentMap] = OrderedDict()
_FILE_CACHE_SIZE = 8


def _cached_load(path: Path, height: int | None) -> EnvironmentMap:
    key = (str(path), height)
    if key in _FILE_CACHE:
        _FILE_CACHE.move_to_end(key)
        return _FILE_CACHE[key]
    env = load_envmap(path, height)
    _FILE_CACHE[key] = env
    while len(_FILE_CACHE) > _FILE_CACHE_SIZE:
        _FILE_CACHE.popitem(last=False)
    return env


def random_envmap(
    source: Sequence[str | Path] | None,
    generator: torch.Generator | None = None,
    height: int = 64,
    procedural_fraction: float = 0.0,
) -> EnvironmentMap:
    """One training iteration's lighting: a map from ``source`` files (or a procedural sky when
    ``source`` is empty/None, or with probability ``procedural_fraction``), rotated about +Y by
    a random whole number of columns (so the rotation is an exact roll).

    File maps are loaded once (a small LRU cache) at ``height x 2*height``; their prefiltered
    lighting is then reused across rotations (see ``pbr.prefilter_envmap``).
    """
    if not 0.0 <= procedural_fraction <= 1.0:
        raise EnvMapError(f"procedural_fraction must be in [0, 1], got {procedural_fraction}")
    files = list(source or [])
    use_procedural = not files or float(torch.rand((), generator=generator, dtype=torch.float64)) < procedural_fraction
    if use_procedural:
        env = procedural_envmap(generator, height)
    else:
        env = _cached_load(Path(files[int(torch.randint(0, len(files), (), generator=generator))]), height)
    column = int(torch.randint(0, env.width, (), generator=generator))
    return rotate_y(env, column * 360.0 / env.width)


def studio_envmap(height: int = 64) -> EnvironmentMap:
    """The fixed studio HDR every turntable (and evaluation render) is lit with, so renders of
    different runs, expressions and heads are lit the same way and can be compared.

    No randomness: a neutral grey backdrop (brighter toward the ceiling, a darker floor) and three
    soft-edged round area lights in the head's frame (it faces +Z): a key (25 deg radius) in front,
    40 deg toward -X (the viewer's left in the front view) and 30 deg up, 5600 K; a larger, weaker
    fill in front, 50 deg toward +X and 10 deg up, 6500 K; a rim light behind and 40 deg up, 6000 K.
    Lights are sized in degrees and scaled to a set irradiance (key 2.5x, fill 1x, rim 1.6x the
    backdrop's), so the lighting barely changes with ``height``; the key has the highest radiance.
    """
    if height < 4:
        raise EnvMapError(f"studio environment map height must be >= 4, got {height}")
    H, W = height, 2 * height
    d = pixel_directions(H, W, torch.float64)
    y = d[..., 1:2]
    wall = 0.30 + 0.10 * y.clamp(min=0)  # a soft ceiling gradient above the horizon
    blend = ((y + 0.05) / 0.1).clamp(0, 1)  # a few degrees of smooth horizon, no aliased step
    rad = (wall * blend + 0.18 * (1 - blend)).expand(H, W, 3).clone()

    dw = pixel_solid_angles(H, W, torch.float64).unsqueeze(-1)  # [H, 1, 1]
    backdrop_irradiance = math.pi * 0.35  # a surface facing up, lit by the wall alone
    min_radius = 1.5 * math.pi / H  # a light narrower than ~1.5 pixels would alias away
    # (azimuth deg: 0 = +Z, 90 = +X; elevation deg; angular radius deg; kelvin; irradiance / backdrop's)
    lights = ((-40.0, 30.0, 25.0, 5600.0, 2.5), (50.0, 10.0, 30.0, 6500.0, 1.0),
              (180.0, 40.0, 22.0, 6000.0, 1.6))
    for az_deg, el_deg, radius_deg, kelvin, strength in lights:
        az, el = math.radians(az_deg), math.radians(el_deg)
        radius = max(math.radians(radius_deg), min_radius)
        axis = torch.tensor([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)],
                            dtype=torch.float64)
        ang = torch.acos((d @ axis).clamp(-1, 1)).unsqueeze(-1)
        w = ((1.3 * radius - ang) / (0.6 * radius)).clamp(0, 1)
        w = w * w * (3 - 2 * w)  # smoothstep: a softbox's soft edge
        peak = strength * backdrop_irradiance / max(float((w * dw).sum()), 1e-12)
        rad = rad + w * peak * blackbody_rgb(kelvin)
    return EnvironmentMap(rad.to(torch.float32), "studio")
