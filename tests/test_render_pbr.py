"""Claims about PBR shading: furnace tests, mirror reflections, prefiltering, gradients, renders."""

import math

import torch
import trimesh

from idto3d.render import Mesh, orbit_camera
from idto3d.render.envmap import (
    EnvironmentMap, direction_to_uv, pixel_directions, pixel_solid_angles, procedural_envmap, rotate_y,
)
from idto3d.render.pbr import (
    _ggx_convolve, _ggx_weights, cook_torrance, env_brdf_approx, linear_to_srgb, prefilter_envmap, render_pbr,
    sh9_irradiance, sh9_project, shade_pbr,
)


def _constant(L: float = 2.0, H: int = 16) -> EnvironmentMap:
    return EnvironmentMap(torch.full((H, 2 * H, 3), L))


def _spot_env(direction, H: int = 32) -> EnvironmentMap:
    rad = torch.full((H, 2 * H, 3), 0.05)
    uv = direction_to_uv(torch.tensor(direction, dtype=torch.float32))
    i, j = int(float(uv[1]) * H), int(float(uv[0]) * 2 * H) % (2 * H)
    rad[max(i - 1, 0):i + 2, j - 1:j + 2] = 50.0
    return EnvironmentMap(rad)


def _front_facing(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    normals = torch.randn(n, 3, generator=g)
    views = torch.randn(n, 3, generator=g)
    views = torch.where((normals * views).sum(-1, keepdim=True) < 0, -views, views)
    return normals, views


def test_sh_irradiance_of_a_constant_environment_is_pi_L():
    sh = sh9_project(_constant(2.0).radiance)
    normals, _ = _front_facing(200)
    assert torch.allclose(sh9_irradiance(sh, torch.nn.functional.normalize(normals, dim=-1)),
                          torch.full((200, 3), 2.0 * math.pi), rtol=1e-3)


def test_sh_irradiance_matches_brute_force_cosine_integral_for_a_smooth_sky():
    H = 32
    d = pixel_directions(H, 2 * H)
    rad = (1.2 + d[..., 1:2] + 0.5 * d[..., 0:1] * d[..., 2:3]).expand(H, 2 * H, 3).contiguous()  # band <= 2
    normals = torch.nn.functional.normalize(torch.randn(20, 3, generator=torch.Generator().manual_seed(1)), dim=-1)
    dw = pixel_solid_angles(H, 2 * H)
    brute = torch.einsum("nhw,hwc->nc", (torch.einsum("nk,hwk->nhw", normals, d).clamp(min=0) * dw), rad)
    assert torch.allclose(sh9_irradiance(sh9_project(rad), normals), brute, rtol=0.03)


def test_white_furnace_never_reflects_more_than_it_receives():
    env, L = _constant(2.0), 2.0
    normals, views = _front_facing(500)
    for metallic in (0.0, 0.5, 1.0):
        for roughness in (0.0, 0.3, 0.7, 1.0):
            out = shade_pbr(normals, views, torch.ones(500, 3), roughness, metallic, env)
            assert float(out.max()) <= L * 1.002, (metallic, roughness)
            if metallic == 0.0:  # a white dielectric: diffuse takes what specular leaves
                assert float(out.min()) >= L * 0.99
    # Darker albedo reflects proportionally less diffuse light.
    grey = shade_pbr(normals, views, torch.full((500, 3), 0.5), 1.0, 0.0, env)
    assert float(grey.max()) < 0.6 * L


def test_karis_env_brdf_matches_monte_carlo_of_the_cook_torrance_brdf():
    """The split-sum specular albedo F0*A+B agrees with integrating the explicit GGX BRDF, to the
    accuracy of Karis' coarse mobile fit (measured: up to ~0.15 off for metals at NoV 0.9)."""
    g = torch.Generator().manual_seed(0)
    n_samples = 200_000
    # Uniform directions on the upper hemisphere (z up here; the BRDF is rotation invariant).
    u1, u2 = torch.rand(n_samples, generator=g, dtype=torch.float64), torch.rand(n_samples, generator=g, dtype=torch.float64)
    z, phi = u1, 2 * math.pi * u2
    r = torch.sqrt(1 - z * z)
    light = torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], -1)
    normal = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand_as(light)
    for roughness in (0.5, 0.8):
        for n_dot_v in (0.4, 0.9):
            view = torch.tensor([math.sqrt(1 - n_dot_v ** 2), 0.0, n_dot_v], dtype=torch.float64).expand_as(light)
            rough = torch.full((n_samples, 1), roughness, dtype=torch.float64)
            metal = torch.ones(n_samples, 1, dtype=torch.float64)  # pure specular, F0 = albedo
            f = cook_torrance(normal, view, light, torch.ones(n_samples, 3, dtype=torch.float64), rough, metal)
            mc = float((f[:, 0] * z).mean() * 2 * math.pi)  # pdf = 1 / (2 pi)
            a, b = env_brdf_approx(torch.tensor([[n_dot_v]]), torch.tensor([[roughness]]))
            assert abs(float(a + b) - mc) < 0.16, (roughness, n_dot_v, float(a + b), mc)


def test_mirror_metal_reflects_the_bright_spot_in_the_mirror_direction():
    spot = torch.tensor([1.0, 0.0, 0.0])
    env = _spot_env(spot.tolist())
    view = torch.tensor([0.0, 0.0, 1.0])
    toward_spot = torch.nn.functional.normalize(view + spot, dim=0)  # reflects view onto the spot
    away = torch.nn.functional.normalize(view - spot, dim=0)
    out = shade_pbr(torch.stack([toward_spot, away]), view.expand(2, 3), torch.ones(2, 3), 0.0, 1.0, env)
    assert float(out[0].min()) > 30 and float(out[1].max()) < 1
    # Rougher metal spreads the spot: dimmer peak.
    rough = shade_pbr(toward_spot[None], view[None], torch.ones(1, 3), 0.6, 1.0, env)
    assert float(rough.max()) < 0.5 * float(out[0].min())


def _sphere() -> Mesh:
    ico = trimesh.creation.icosphere(subdivisions=3)
    return Mesh(torch.tensor(ico.vertices, dtype=torch.float32), torch.tensor(ico.faces, dtype=torch.int64))


def test_rendered_mirror_sphere_shows_the_light_above_in_its_upper_half():
    env = _spot_env([0.0, 1.0, 0.0])  # light at the zenith; the camera looks along -Z
    out = render_pbr(_sphere(), orbit_camera(0.0, 0.0, 3.0, 40.0), 64, 1.0, 0.05, 1.0, env, background=0.0)
    lum = out.image[0].mean(-1)
    row, col = divmod(int(lum.argmax()), 64)
    # Normal halfway between the view (+Z) and the light (+Y): 45 deg up the visible disc.
    half = torch.nn.functional.normalize(torch.tensor([0.0, 1.0, 1.0]), dim=0)
    r_px = 64 / 2 / (3.0 * math.tan(math.radians(20))) * float(half[1])  # roughly, ignoring perspective
    assert col in (31, 32) and abs((31.5 - row) - r_px) < 4
    assert out.mask.shape == (1, 64, 64, 1) and float(out.image[0, 0, 0].abs().max()) == 0.0


def test_gradients_flow_to_albedo_roughness_metallic_per_vertex_and_texture():
    mesh = _sphere()
    env = procedural_envmap(torch.Generator().manual_seed(0), 16)
    cam = orbit_camera(10.0, 30.0, 3.0, 40.0)
    V = mesh.vertices.shape[0]
    albedo = torch.full((V, 3), 0.6, requires_grad=True)
    rough = torch.full((V, 1), 0.5, requires_grad=True)
    metal = torch.full((V, 1), 0.3, requires_grad=True)
    out = render_pbr(mesh, cam, 32, albedo, rough, metal, env)
    linear_to_srgb(out.image).sum().backward()
    for t in (albedo, rough, metal):
        assert t.grad is not None and torch.isfinite(t.grad).all() and float(t.grad.abs().sum()) > 0
    # UV textures: spherical UVs, gradients reach the texels.
    uv = torch.stack([0.5 + torch.atan2(mesh.vertices[:, 0], mesh.vertices[:, 2]) / (2 * math.pi),
                      0.5 + torch.asin(mesh.vertices[:, 1].clamp(-1, 1)) / math.pi], -1)
    tex = torch.full((8, 8, 3), 0.5, requires_grad=True)
    rough_tex = torch.full((8, 8, 1), 0.4, requires_grad=True)
    out = render_pbr(mesh, cam, 32, tex, rough_tex, 0.0, env, uv=uv)
    out.image.sum().backward()
    assert float(tex.grad.abs().sum()) > 0 and float(rough_tex.grad.abs().sum()) > 0


def test_prefilter_fft_matches_brute_force_and_rotation_reuses_the_base():
    env = procedural_envmap(torch.Generator().manual_seed(4), 8)
    H, W = 8, 16
    d = pixel_directions(H, W, torch.float64).reshape(-1, 3)
    dw = pixel_solid_angles(H, W, torch.float64).expand(H, W).reshape(-1)
    for roughness in (0.3, 0.9):
        w = _ggx_weights(d @ d.T, roughness) * dw
        brute = ((w @ env.radiance.reshape(-1, 3).double()) / w.sum(-1, keepdim=True)).reshape(H, W, 3)
        assert torch.allclose(_ggx_convolve(env.radiance, roughness).double(), brute, rtol=1e-4, atol=1e-5)
    base = prefilter_envmap(env)
    assert prefilter_envmap(env) is base  # cached
    turned = rotate_y(env, 90)
    pre = prefilter_envmap(turned)
    direct = prefilter_envmap(EnvironmentMap(turned.radiance.clone()))  # same map, no provenance
    for a, b in zip(pre.levels, direct.levels):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert torch.allclose(pre.sh, direct.sh)


def test_linear_to_srgb_endpoints_and_midpoint():
    x = torch.tensor([0.0, 0.0031308, 0.214, 1.0, 3.0])
    y = linear_to_srgb(x)
    assert torch.allclose(y, torch.tensor([0.0, 0.0404, 0.5, 1.0, 1.0]), atol=2e-3)
