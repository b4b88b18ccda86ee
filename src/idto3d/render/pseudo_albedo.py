"""The pseudo-albedo image of the paper's eq. 7: ``g(theta_a, c, l)``, the texture rendered from camera ``c``
under lighting ``l``, which the albedo prior scores.

Why an exposure rule: an HDR map's absolute level is arbitrary (a sky is ~1, a studio map ~100), but the
albedo prior was trained on unlit albedo images in [0, 1]. Each map is scaled so its solid-angle-weighted
mean luminance is 1; the average irradiance over all normal directions is then pi, so a Lambertian
surface of albedo ``a`` averages ``a`` over the sphere of normals, whatever the map. Random lighting then
varies the shading around the albedo instead of around an arbitrary brightness, which is the paper's
regulariser (reflectance that looks right under every lighting is the reflectance).

Colour convention: albedo textures hold sRGB-encoded values (as the prior's images and the exported PNGs);
they are decoded to linear for shading and the result is encoded back with the sRGB curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from idto3d.render.backend import Rasterizer
from idto3d.render.camera import Camera
from idto3d.render.envmap import EnvironmentMap, pixel_solid_angles, srgb_to_linear
from idto3d.render.mesh import Mesh
from idto3d.render.pbr import PBRRender, PrefilteredEnv, linear_to_srgb, prefilter_envmap, render_pbr

_LUMA = (0.2126, 0.7152, 0.0722)

# Constant white radiance: after the exposure rule the diffuse term returns the albedo itself (E = pi everywhere).
FLAT_LIGHT = EnvironmentMap(torch.ones(8, 16, 3), "flat")


def mean_luminance(env: EnvironmentMap) -> float:
    """Solid-angle-weighted mean luminance of the map (linear)."""
    return float(_mean_luminance(env))


def _mean_luminance(env: EnvironmentMap) -> torch.Tensor:
    """``mean_luminance`` as a float64 scalar on the map's device (no wait for the device)."""
    rad = env.radiance.detach().double()
    dw = pixel_solid_angles(env.height, env.width, torch.float64, rad.device)  # [H, 1]: per pixel of a row
    luma = rad @ torch.tensor(_LUMA, dtype=torch.float64, device=rad.device)
    return (luma * dw).sum() / (4 * math.pi)


def exposed(env: EnvironmentMap) -> PrefilteredEnv:
    """The map's prefiltered lighting scaled to mean luminance 1 (see the module docstring).

    Scaling the prefiltered levels, not the map, keeps the prefilter cache of rotated maps useful.
    """
    pre = prefilter_envmap(env)
    k = (1.0 / _mean_luminance(env).clamp_min(1e-8)).to(pre.sh.dtype)  # stays on the device
    return PrefilteredEnv([lv * k for lv in pre.levels], pre.sh * k)


@dataclass
class PseudoAlbedo:
    image: torch.Tensor  # [B, H, W, 3] sRGB in [0, 1] over the background, antialiased
    mask: torch.Tensor   # [B, H, W, 1] antialiased coverage
    pbr: PBRRender       # the linear render and its material buffers

    def for_guidance(self) -> torch.Tensor:
        """``[B, 4, H, W]``: RGB + coverage, as the geometry stage hands normal maps to guidance."""
        return torch.cat([self.image, self.mask], dim=-1).permute(0, 3, 1, 2)


def render_pseudo_albedo(
    mesh: Mesh,
    cameras: Camera,
    resolution: int | tuple[int, int],
    albedo: torch.Tensor,
    roughness: torch.Tensor | float,
    metallic: torch.Tensor | float,
    env: EnvironmentMap,
    *,
    uv: torch.Tensor | None = None,
    attribute_faces: torch.Tensor | None = None,
    diffuse_only: bool = False,
    background: float = 1.0,
    rasterizer: Rasterizer | None = None,
) -> PseudoAlbedo:
    """Render sRGB ``albedo`` (texture ``[T, T, 3]`` with ``uv``, or per vertex) with the GGX material under
    ``env`` at the exposure of the module docstring. ``diffuse_only`` drops the specular lobe (the first
    texture sub-stage); ``background`` is an sRGB grey level."""
    pre = exposed(env)
    bg = float(srgb_to_linear(torch.tensor(float(background))))
    out = render_pbr(mesh, cameras, resolution, srgb_to_linear(albedo.clamp(0, 1)), roughness, metallic, pre,
                     uv=uv, attribute_faces=attribute_faces, background=bg, rasterizer=rasterizer,
                     specular=not diffuse_only)
    return PseudoAlbedo(linear_to_srgb(out.image), out.mask, out)
