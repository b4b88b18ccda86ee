"""PBR shading against references written here from the standard definitions (Karis 2013, glTF metallic-
roughness): dielectric F0 = 0.04, GGX D with alpha = roughness^2, Smith-Schlick G with k = alpha / 2, Schlick F.

The split-sum shading is compared with the hemisphere integral of that BRDF under a uniform white environment
("white furnace"): at normal incidence the specular part a black dielectric reflects is its directional albedo,
about F0 = 0.04 for a smooth surface.
"""

from __future__ import annotations

import math

import pytest
import torch

from idto3d.render.envmap import EnvironmentMap
from idto3d.render.pbr import cook_torrance, shade_pbr

F0_DIELECTRIC = 0.04


def reference_brdf(n, v, l, albedo, roughness, metallic):  # noqa: ANN001, E741
    """Lambert + GGX specular, float64, written out from the definitions."""
    n, v, l = (torch.nn.functional.normalize(x.double(), dim=-1) for x in (n, v, l))
    h = torch.nn.functional.normalize(v + l, dim=-1)
    nv, nl = (n * v).sum(-1, keepdim=True), (n * l).sum(-1, keepdim=True)
    nh, vh = (n * h).sum(-1, keepdim=True), (v * h).sum(-1, keepdim=True)
    alpha = roughness.double() ** 2
    d = alpha**2 / (math.pi * (nh**2 * (alpha**2 - 1) + 1) ** 2)
    k = alpha / 2
    g = (nv / (nv * (1 - k) + k)) * (nl / (nl * (1 - k) + k))
    f0 = F0_DIELECTRIC * (1 - metallic.double()) + albedo.double() * metallic.double()
    f = f0 + (1 - f0) * (1 - vh) ** 5
    spec = d * g * f / (4 * nv * nl)
    diffuse = (1 - f) * (1 - metallic.double()) * albedo.double() / math.pi
    return diffuse + spec


def directional_specular_albedo(roughness: float, f0: float = F0_DIELECTRIC, steps: int = 20000) -> float:
    """Integral over the hemisphere of the GGX specular BRDF x cos(l), viewed along the normal (v = n): the
    radiance a black material reflects under a uniform environment of radiance 1. With v = n the integrand
    depends on the polar angle of l only; the half vector is at half that angle."""
    theta = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps * (math.pi / 2)
    cos_l, cos_h = torch.cos(theta), torch.cos(theta / 2)
    alpha = roughness**2
    d = alpha**2 / (math.pi * (cos_h**2 * (alpha**2 - 1) + 1) ** 2)
    k = alpha / 2
    g = 1.0 * cos_l / (cos_l * (1 - k) + k)
    f = f0 + (1 - f0) * (1 - cos_h) ** 5
    brdf = d * g * f / (4 * cos_l)
    integrand = brdf * cos_l * torch.sin(theta) * 2 * math.pi
    return float(integrand.sum() * (math.pi / 2) / steps)


def test_cook_torrance_at_normal_incidence_is_f0_over_4_pi_alpha_squared():
    """n = v = l: D = 1 / (pi alpha^2), G = 1, F = F0, so the specular BRDF is F0 / (4 pi alpha^2)."""
    up = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    for roughness in (0.3, 0.5, 0.8):
        alpha = roughness**2
        black = cook_torrance(up, up, up, torch.zeros(1, 3, dtype=torch.float64),
                              torch.full((1, 1), roughness, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64))
        expected = F0_DIELECTRIC / (4 * math.pi * alpha**2)
        assert float(black[0, 0]) == pytest.approx(expected, rel=1e-6), \
            f"roughness {roughness}: a black dielectric's BRDF at normal incidence is {float(black[0, 0])}, " \
            f"expected F0/(4 pi alpha^2) = {expected} with F0 = {F0_DIELECTRIC}"
        # The Lambert lobe of a white dielectric takes what the Fresnel term leaves: (1 - F0) / pi.
        white = cook_torrance(up, up, up, torch.ones(1, 3, dtype=torch.float64),
                              torch.full((1, 1), roughness, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64))
        assert float(white[0, 0]) == pytest.approx(expected + (1 - F0_DIELECTRIC) / math.pi, rel=1e-6)


def test_cook_torrance_matches_the_reference_brdf_in_random_directions():
    g = torch.Generator().manual_seed(0)
    n_dirs = 256
    n = torch.nn.functional.normalize(torch.randn(n_dirs, 3, generator=g, dtype=torch.float64), dim=-1)

    def upper(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.normalize(x, dim=-1)
        return torch.where((x * n).sum(-1, keepdim=True) < 0.05, x - 2 * (x * n).sum(-1, keepdim=True) * n + 0.2 * n, x)

    v = upper(torch.randn(n_dirs, 3, generator=g, dtype=torch.float64))
    l = upper(torch.randn(n_dirs, 3, generator=g, dtype=torch.float64))  # noqa: E741
    albedo = torch.rand(n_dirs, 3, generator=g, dtype=torch.float64)
    rough = 0.2 + 0.8 * torch.rand(n_dirs, 1, generator=g, dtype=torch.float64)
    for metal in (torch.zeros(n_dirs, 1, dtype=torch.float64), torch.rand(n_dirs, 1, generator=g, dtype=torch.float64)):
        ours = cook_torrance(n, v, l, albedo, rough, metal)
        ref = reference_brdf(n, v, l, albedo, rough, metal)
        front = (((n * v).sum(-1) > 0) & ((n * torch.nn.functional.normalize(l, dim=-1)).sum(-1) > 0))
        assert front.sum() > n_dirs // 2
        torch.testing.assert_close(ours[front], ref[front], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("roughness", [0.2, 0.5])
def test_a_black_dielectric_in_a_white_furnace_reflects_its_specular_albedo(roughness):
    env = EnvironmentMap(torch.ones(32, 64, 3))
    up = torch.tensor([[0.0, 0.0, 1.0]])
    out = shade_pbr(up, up, torch.zeros(1, 3), roughness, 0.0, env)
    expected = directional_specular_albedo(roughness)
    # Karis' split-sum fit is coarse (a few % here, ~15 % at roughness 0.5); F0 = 0.4 would be 10x off.
    assert float(out[0, 0]) == pytest.approx(expected, rel=0.2), \
        f"roughness {roughness}: a black dielectric under radiance 1 reflects {float(out[0, 0])} at normal " \
        f"incidence; the GGX integral with F0 = {F0_DIELECTRIC} gives {expected}"


def test_a_grey_dielectric_in_a_white_furnace_is_specular_plus_the_diffuse_rest():
    env = EnvironmentMap(torch.ones(32, 64, 3))
    up = torch.tensor([[0.0, 0.0, 1.0]])
    roughness, grey = 0.2, 0.5
    spec = directional_specular_albedo(roughness)
    out = shade_pbr(up, up, torch.full((1, 3), grey), roughness, 0.0, env)
    expected = spec + (1 - spec) * grey
    assert float(out[0, 0]) == pytest.approx(expected, rel=0.02), \
        f"a grey (0.5) dielectric under radiance 1 reflects {float(out[0, 0])}; expected specular {spec} plus " \
        f"grey x the rest = {expected}"
