"""Physically based shading: a Cook-Torrance GGX material lit by an HDR environment map.

Model (metallic-roughness, as in glTF / UE4): ``alpha = roughness^2``, Trowbridge-Reitz (GGX)
distribution ``D``, Smith-Schlick visibility ``G`` (``k = alpha / 2``), Schlick Fresnel with
``F0 = mix(0.04, albedo, metallic)``.

Image-based lighting uses Karis' split-sum approximation (Real Shading in Unreal Engine 4,
2013), everything computed in closed form or once per environment map:

* diffuse: the irradiance ``E(n)`` from a 9-coefficient spherical-harmonic projection of the
  map (Ramamoorthi & Hanrahan 2001), exact for constant lighting, cheap to re-project;
* specular radiance: the map convolved with the GGX lobe (``n = v = r`` assumption, weights
  ``D(h) (n.l) / 4``) at ``levels`` evenly spaced roughnesses, brute force at a resolution that
  shrinks with roughness; level 0 is the map itself (a mirror). Lookups blend the two nearest
  levels linearly, so shading is differentiable w.r.t. roughness;
* the environment BRDF ``F0 * A + B`` from Karis' analytic fit (Physically Based Shading on
  Mobile, 2014) instead of a 2-D lookup texture, so nothing is read from disk. ``A + B`` is
  clipped to 1 and the diffuse lobe gets ``(1 - metallic)(1 - (0.04 A + B))``, the energy the
  dielectric specular did not reflect, so a white surface in a constant environment (the
  "furnace test") never reflects more than it receives.

Prefiltering happens once per map and is cached; a map rotated with ``envmap.rotate_y`` reuses
its base map's prefiltered levels by rotating them too (a column roll).
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from idto3d.core.errors import IdtoError
from idto3d.render.albedo import _check_attribute, sample_texture
from idto3d.render.backend import Rasterizer, get_rasterizer
from idto3d.render.camera import Camera
from idto3d.render.envmap import (
    EnvironmentMap, pixel_directions, pixel_solid_angles, resize_envmap, rotate_columns, sample_equirect,
)
from idto3d.render.fragments import Fragments, checked_faces, parse_resolution
from idto3d.render.mesh import Mesh

DIELECTRIC_F0 = 0.04
MIN_ROUGHNESS = 0.02  # keeps D finite in the analytic BRDF


def linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    """The sRGB transfer curve on linear values clipped to [0, 1] (differentiable)."""
    x = x.clamp(0, 1)
    return torch.where(x <= 0.0031308, x * 12.92, 1.055 * x.clamp(min=0.0031308) ** (1 / 2.4) - 0.055)


# ---------------------------------------------------------------- BRDF terms

def ggx_distribution(n_dot_h: torch.Tensor, roughness: torch.Tensor) -> torch.Tensor:
    """Trowbridge-Reitz normal distribution ``D`` with ``alpha = roughness^2``."""
    a2 = roughness.clamp(min=MIN_ROUGHNESS) ** 4
    denom = n_dot_h.clamp(0, 1) ** 2 * (a2 - 1) + 1
    return a2 / (math.pi * denom * denom)


def smith_schlick_g(n_dot_v: torch.Tensor, n_dot_l: torch.Tensor, roughness: torch.Tensor) -> torch.Tensor:
    """Smith shadowing-masking with Schlick's G1 and ``k = alpha / 2`` (Karis' IBL choice)."""
    k = roughness ** 2 / 2
    g1 = lambda c: c / (c * (1 - k) + k)  # noqa: E731
    return g1(n_dot_v.clamp(min=1e-6)) * g1(n_dot_l.clamp(min=1e-6))


def fresnel_schlick(v_dot_h: torch.Tensor, f0: torch.Tensor) -> torch.Tensor:
    return f0 + (1 - f0) * (1 - v_dot_h.clamp(0, 1)) ** 5


def cook_torrance(normals: torch.Tensor, view_dirs: torch.Tensor, light_dirs: torch.Tensor,
                  albedo: torch.Tensor, roughness: torch.Tensor, metallic: torch.Tensor) -> torch.Tensor:
    """The BRDF value ``f(l, v)`` ``[..., 3]`` (Lambert + GGX specular), without the cosine.

    All directions point away from the surface; ``roughness`` / ``metallic`` are ``[..., 1]``.
    Used for analytic lights and to check the split-sum approximation.
    """
    n, v, l = (F.normalize(t, dim=-1) for t in (normals, view_dirs, light_dirs))
    h = F.normalize(v + l, dim=-1)
    n_v, n_l = (n * v).sum(-1, keepdim=True), (n * l).sum(-1, keepdim=True)
    n_h, v_h = (n * h).sum(-1, keepdim=True), (v * h).sum(-1, keepdim=True)
    f0 = DIELECTRIC_F0 * (1 - metallic) + albedo * metallic
    fr = fresnel_schlick(v_h, f0)
    spec = ggx_distribution(n_h, roughness) * smith_schlick_g(n_v, n_l, roughness) * fr / (
        4 * n_v.clamp(min=1e-6) * n_l.clamp(min=1e-6))
    diffuse = (1 - fr) * (1 - metallic) * albedo / math.pi
    front = ((n_v > 0) & (n_l > 0)).to(spec.dtype)
    return (diffuse + spec) * front


def env_brdf_approx(n_dot_v: torch.Tensor, roughness: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Karis' analytic fit of the split-sum BRDF integral: specular albedo is ``F0 * A + B``.

    ``A, B`` are clipped to ``>= 0`` and ``A + B <= 1`` (the raw fit overshoots by a few
    percent at grazing angles), which keeps the material energy conserving.
    """
    c0 = torch.tensor([-1.0, -0.0275, -0.572, 0.022], dtype=roughness.dtype, device=roughness.device)
    c1 = torch.tensor([1.0, 0.0425, 1.04, -0.04], dtype=roughness.dtype, device=roughness.device)
    r = roughness * c0 + c1  # [..., 4]
    a004 = torch.minimum(r[..., :1] * r[..., :1], torch.exp2(-9.28 * n_dot_v)) * r[..., :1] + r[..., 1:2]
    a = (-1.04 * a004 + r[..., 2:3]).clamp(min=0)
    b = (1.04 * a004 + r[..., 3:4]).clamp(min=0)
    total = (a + b).clamp(min=1.0)
    return a / total, b / total


# ---------------------------------------------------------------- spherical harmonics

_SH_BAND = (0, 1, 1, 1, 2, 2, 2, 2, 2)
# Convolution with the clamped cosine, per band (Ramamoorthi & Hanrahan 2001).
_COSINE_LOBE = (math.pi, 2 * math.pi / 3, math.pi / 4)


def sh9_basis(dirs: torch.Tensor) -> torch.Tensor:
    """Real spherical harmonics up to band 2 at unit directions ``[..., 3]`` -> ``[..., 9]``."""
    x, y, z = dirs.unbind(-1)
    return torch.stack([
        torch.full_like(x, 0.282095),
        0.488603 * y, 0.488603 * z, 0.488603 * x,
        1.092548 * x * y, 1.092548 * y * z, 0.315392 * (3 * z * z - 1), 1.092548 * x * z,
        0.546274 * (x * x - y * y),
    ], -1)


@functools.lru_cache(maxsize=16)
def _sh9_pixel_weights(height: int, width: int, subrows: int = 8) -> torch.Tensor:
    """``[H, W, 9]``: each SH basis function integrated over each pixel's solid angle.

    Rows are split into ``subrows`` bands so the quadrature is accurate (a constant map's
    band-1/2 coefficients vanish to ~1e-4 instead of ~1e-2 with one sample per pixel).
    """
    fine = subrows * height
    dirs = pixel_directions(fine, width, torch.float64)
    w = sh9_basis(dirs) * pixel_solid_angles(fine, width, torch.float64).unsqueeze(-1)
    return w.reshape(height, subrows, width, 9).sum(1)


def sh9_project(radiance: torch.Tensor) -> torch.Tensor:
    """SH coefficients ``[9, 3]`` of an equirectangular map of piecewise-constant pixels."""
    H, W, _ = radiance.shape
    weights = _sh9_pixel_weights(H, W).to(radiance.device)
    return torch.einsum("hwk,hwc->kc", weights, radiance.to(torch.float64)).to(radiance.dtype)


def sh9_irradiance(sh: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    """Irradiance ``E(n)`` ``[..., 3]`` (so a white Lambertian surface reflects ``E / pi``)."""
    lobe = torch.tensor([_COSINE_LOBE[b] for b in _SH_BAND], dtype=sh.dtype, device=sh.device)
    return (sh9_basis(normals).to(sh.dtype) @ (sh * lobe[:, None])).clamp(min=0)


# ---------------------------------------------------------------- prefiltering

@dataclass
class PrefilteredEnv:
    """What shading needs from a map: specular radiance per roughness level and SH irradiance."""

    levels: list[torch.Tensor]  # [h_k, 2 h_k, 3] for roughness k / (len - 1)
    sh: torch.Tensor  # [9, 3]

    @property
    def roughness(self) -> torch.Tensor:
        return torch.linspace(0, 1, len(self.levels))


def _level_height(roughness: float, height: int) -> int:
    # The GGX lobe is ~2 alpha radians wide in the reflected direction; keep >= ~4 pixels across it.
    alpha = roughness * roughness
    want = 4 * math.pi / (2 * alpha) if alpha > 0 else height
    return int(min(height, max(8, 2 ** math.ceil(math.log2(max(want, 1))))))


def _ggx_weights(cos_angle: torch.Tensor, roughness: float) -> torch.Tensor:
    """Prefilter weight of a source direction at angle ``acos(cos_angle)`` from the lobe axis:
    ``D(h) (n.l) / 4`` with ``n = v = r`` (the 1/4 and dw factors are applied by the caller)."""
    a2 = max(roughness, MIN_ROUGHNESS) ** 4
    nh2 = (1 + cos_angle) / 2
    return a2 / (math.pi * (nh2 * (a2 - 1) + 1) ** 2) * cos_angle.clamp(min=0)


def _ggx_convolve(radiance: torch.Tensor, roughness: float) -> torch.Tensor:
    """GGX-lobe blur of an equirectangular map, output at the input's resolution.

    The weight between two pixels depends only on their rows and their column difference, so
    each output row is a sum over source rows of circular cross-correlations along the columns,
    done with real FFTs: O(H^2 W log W) instead of the brute-force O(H^2 W^2).
    """
    H, W, _ = radiance.shape
    theta = (torch.arange(H, dtype=torch.float64, device=radiance.device) + 0.5) / H * math.pi
    dphi = torch.arange(W, dtype=torch.float64, device=radiance.device) / W * 2 * math.pi
    cos_angle = (torch.cos(theta)[:, None, None] * torch.cos(theta)[None, :, None]
                 + torch.sin(theta)[:, None, None] * torch.sin(theta)[None, :, None] * torch.cos(dphi))
    w = _ggx_weights(cos_angle, roughness) * pixel_solid_angles(H, W, torch.float64, radiance.device)[None]
    kernel = torch.fft.rfft(w, dim=-1)  # [H_out, H_src, W//2+1]
    src = torch.fft.rfft(radiance.to(torch.float64), dim=1)  # [H_src, W//2+1, 3]
    out = torch.fft.irfft(torch.einsum("ohf,hfc->ofc", kernel.conj(), src), n=W, dim=1)
    return (out / w.sum((1, 2))[:, None, None]).clamp(min=0).to(radiance.dtype)


_CACHE: "weakref.WeakKeyDictionary[EnvironmentMap, dict[int, PrefilteredEnv]]" = weakref.WeakKeyDictionary()


def prefilter_envmap(env: EnvironmentMap, levels: int = 5, max_height: int = 64) -> PrefilteredEnv:
    """Specular levels (roughness 0, 1/(levels-1), ..., 1) and SH irradiance for ``env``, cached.

    Blurred levels are computed at most ``max_height`` rows tall (smaller for rougher levels);
    a map made by ``rotate_y`` reuses its base map's levels, rotated.
    """
    if levels < 2:
        raise IdtoError(f"prefiltering needs at least 2 roughness levels, got {levels}")
    cached = _CACHE.get(env, {}).get(levels)
    if cached is not None:
        return cached
    if env.base is not None:
        base = prefilter_envmap(env.base, levels, max_height)
        spec = [env.radiance] + [rotate_columns(lv, env.rotation_deg) for lv in base.levels[1:]]
    else:
        spec = [env.radiance]
        for k in range(1, levels):
            r = k / (levels - 1)
            small = resize_envmap(env, _level_height(r, min(env.height, max_height))).radiance
            spec.append(_ggx_convolve(small, r))
    result = PrefilteredEnv(spec, sh9_project(env.radiance))
    _CACHE.setdefault(env, {})[levels] = result
    return result


def _specular_lookup(pre: PrefilteredEnv, dirs: torch.Tensor, roughness: torch.Tensor) -> torch.Tensor:
    n = len(pre.levels)
    pos = roughness.clamp(0, 1) * (n - 1)  # [..., 1]
    out = torch.zeros(*dirs.shape[:-1], 3, dtype=dirs.dtype, device=dirs.device)
    for k, level in enumerate(pre.levels):
        w = (1 - (pos - k).abs()).clamp(min=0)
        # Every level is sampled, even where all its weights are 0: asking would make the host wait for the GPU.
        out = out + w * sample_equirect(level.to(dirs.device, dirs.dtype), dirs)
    return out


# ---------------------------------------------------------------- shading

def shade_pbr(normals: torch.Tensor, view_dirs: torch.Tensor, albedo: torch.Tensor,
              roughness: torch.Tensor | float, metallic: torch.Tensor | float,
              env: EnvironmentMap | PrefilteredEnv, specular: bool = True) -> torch.Tensor:
    """Outgoing linear radiance ``[..., 3]`` of a GGX material under ``env``.

    ``normals`` and ``view_dirs`` (surface -> viewer) are world-space ``[..., 3]``, need not be
    unit; ``albedo`` ``[..., 3]``; ``roughness``, ``metallic`` ``[..., 1]`` or numbers, in [0, 1].
    Differentiable w.r.t. every input except the environment. ``specular=False`` returns the
    Lambertian term alone, ``albedo * E(n) / pi`` (the texture stage's diffuse-only sub-stage).
    """
    pre = env if isinstance(env, PrefilteredEnv) else prefilter_envmap(env)
    dtype, device = albedo.dtype, albedo.device
    if not specular:
        n = F.normalize(normals.to(dtype), dim=-1, eps=1e-12)
        return albedo * sh9_irradiance(pre.sh.to(device, dtype), n) / math.pi
    rough = torch.as_tensor(roughness, dtype=dtype, device=device).clamp(0, 1)
    metal = torch.as_tensor(metallic, dtype=dtype, device=device).clamp(0, 1)
    n = F.normalize(normals.to(dtype), dim=-1, eps=1e-12)
    v = F.normalize(view_dirs.to(dtype), dim=-1, eps=1e-12)
    n_dot_v = (n * v).sum(-1, keepdim=True)
    reflected = 2 * n_dot_v * n - v
    a, b = env_brdf_approx(n_dot_v.clamp(1e-4, 1), rough.expand(*n_dot_v.shape[:-1], 1))
    f0 = DIELECTRIC_F0 * (1 - metal) + albedo * metal
    spec = _specular_lookup(pre, reflected, rough) * (f0 * a + b)
    irradiance = sh9_irradiance(pre.sh.to(device, dtype), n)
    diffuse = (1 - metal) * (1 - (DIELECTRIC_F0 * a + b)) * albedo * irradiance / math.pi
    return diffuse + spec


@dataclass
class PBRRender:
    image: torch.Tensor  # [B, H, W, 3] linear radiance over the background, antialiased
    mask: torch.Tensor  # [B, H, W, 1] antialiased coverage
    albedo: torch.Tensor  # [B, H, W, 3] material inputs per pixel (zeros on background)
    roughness: torch.Tensor  # [B, H, W, 1]
    metallic: torch.Tensor  # [B, H, W, 1]
    normals: torch.Tensor  # [B, H, W, 3] unit world-space normals, zeros on background
    fragments: Fragments


def render_pbr(
    mesh: Mesh,
    camera: Camera,
    resolution: int | tuple[int, int],
    albedo: torch.Tensor | float,
    roughness: torch.Tensor | float,
    metallic: torch.Tensor | float,
    env: EnvironmentMap | PrefilteredEnv,
    *,
    uv: torch.Tensor | None = None,
    attribute_faces: torch.Tensor | None = None,
    background: float | torch.Tensor = 1.0,
    rasterizer: Rasterizer | None = None,
    specular: bool = True,
) -> PBRRender:
    """Render ``mesh`` with a GGX material under ``env`` (linear radiance; see ``linear_to_srgb``).

    Each material input is a number (constant), per-vertex ``[V, C]`` / ``[B, V, C]``, or, when
    ``uv`` ``[V, 2]`` is given, a texture ``[Ht, Wt, C]`` / ``[B, Ht, Wt, C]`` sampled as in
    ``render_albedo`` (C = 3 for albedo, 1 for roughness and metallic). ``attribute_faces``
    indexes per-vertex inputs / UVs as in ``render_albedo``. ``specular=False``: the diffuse
    term alone (see ``shade_pbr``).
    """
    H, W = parse_resolution(resolution)
    r = rasterizer if rasterizer is not None else get_rasterizer("auto", mesh.device)
    camera = camera.to(mesh.device)
    B = len(camera)
    pre = env if isinstance(env, PrefilteredEnv) else prefilter_envmap(env)

    clip = camera.project(mesh.vertices)
    fragments = r.rasterize(clip, mesh.faces, (H, W))
    coverage = fragments.mask.unsqueeze(-1).to(mesh.vertices.dtype)
    attr_faces = mesh.faces if attribute_faces is None else attribute_faces.to(mesh.device)
    if attr_faces.shape != mesh.faces.shape:
        raise IdtoError(f"attribute_faces must have the mesh's face shape {tuple(mesh.faces.shape)}, "
                        f"got {tuple(attr_faces.shape)}")
    rows = int(mesh.vertices.shape[0])

    pixel_uv = None
    if uv is not None:
        uv_ = _check_attribute("uv", uv, rows if attribute_faces is None else int(uv.shape[-2]), 2, B)
        pixel_uv = r.interpolate(uv_.to(mesh.vertices.dtype), fragments, checked_faces(attr_faces, uv_.shape[1]))

    def material(name: str, value: torch.Tensor | float, channels: int) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            return torch.full((B, H, W, channels), float(value), dtype=mesh.vertices.dtype, device=mesh.device)
        if pixel_uv is not None:
            if value.dim() not in (3, 4) or value.shape[-1] != channels or (
                    value.dim() == 4 and value.shape[0] not in (1, B)):
                raise IdtoError(f"{name} texture must be [H, W, {channels}] or [{B}, H, W, {channels}], "
                                f"got {tuple(value.shape)}")
            return sample_texture(value.to(mesh.device, mesh.vertices.dtype), pixel_uv)
        n_rows = rows if attribute_faces is None else int(value.shape[-2]) if value.dim() >= 2 else 0
        per_vertex = _check_attribute(name, value, n_rows, channels, B)
        return r.interpolate(per_vertex.to(mesh.vertices.dtype), fragments, checked_faces(attr_faces, n_rows))

    alb = material("albedo", albedo, 3) * coverage
    rough = material("roughness", roughness, 1) * coverage
    metal = material("metallic", metallic, 1) * coverage

    normals = F.normalize(r.interpolate(mesh.vertex_normals()[None], fragments, mesh.faces), dim=-1, eps=1e-12)
    normals = normals * coverage
    position = r.interpolate(mesh.vertices[None], fragments, mesh.faces)
    view = camera.eye.to(position.dtype)[:, None, None, :] - position
    rgb = shade_pbr(normals, view, alb, rough, metal, pre, specular) * coverage

    bg = torch.as_tensor(background, dtype=rgb.dtype, device=rgb.device)
    if bg.dim() > 1 or (bg.dim() == 1 and bg.shape[0] not in (1, 3)):
        raise IdtoError(f"background must be a number or an RGB colour, got shape {tuple(bg.shape)}")
    composite = rgb + bg * (1 - coverage)
    aa = r.antialias(torch.cat([composite, coverage], -1), fragments, clip, mesh.faces)
    return PBRRender(image=aa[..., :3], mask=aa[..., 3:], albedo=alb, roughness=rough, metallic=metal,
                     normals=normals, fragments=fragments)
