"""Divide a photo's lighting out of its face pixels: what is left is albedo, so the exported asset relights.

A Lambertian face under distant light shows ``I(x) = a(x) S(n(x))`` (linear RGB), where the shading ``S`` of a
smooth light is, to a few per cent, a 2nd-order spherical-harmonic function of the normal (Ramamoorthi & Hanrahan
2001). With the fitted head's normals at each face pixel, ``a S`` is fitted per channel as ``Y(n) . l_c`` (the 9
SH basis functions, ``render.pbr.sh9_basis``) by iteratively reweighted least squares (Huber weights, so eyes,
brows and lips, whose albedo differs from the skin's, do not tilt the light). The albedo is then the pixel over
its *relative* shading ``S_rel = (Y(n) . l) / mean_face(Y(n) . l)``, with ``l`` the luminance of the three
channels' fits (one shading for all channels: seen from the front, each channel's ambient level trades off against
its frontal term, and per-channel levels tinted the astronaut's skin yellow): the light's pattern over the face is
removed and the photo's exposure of the face kept. One photo cannot fix the albedo's overall level (a bright
albedo under dim light looks like a dark one under bright light); the photo was exposed for the face, so its
mean is the level. (The level was the light's average over all directions before, issue 17: a mostly frontal
portrait light then read as a ~30 % darker albedo, and the astronaut's renders lost identity: mean dlib
distance 0.377 then, 0.361 with this level and the nostrils relaxed, which alone moved it by < 0.001; README
"Offline head".) A small ridge on the
directional coefficients keeps the fit stable when the photo's normals cover only the front of the head.
"""

from __future__ import annotations

import torch

from idto3d.render.envmap import srgb_to_linear
from idto3d.render.pbr import linear_to_srgb, sh9_basis

_RIDGE = 1e-3          # on the 8 directional coefficients, relative to the data term's scale
_RIDGE_BAND2 = 0.01

_HUBER = 0.05          # linear-RGB residual where the weights start to fall
_IRLS_STEPS = 4
_MIN_SHADING = 0.2     # relative shading is clamped here (grazing or shadowed pixels are not blown up)


def fit_sh_light(normals: torch.Tensor, linear: torch.Tensor, weight: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """``[9, 3]`` SH coefficients with ``sh9_basis(normals) @ coeffs ~= linear`` ``[P, 3]`` (robust fit)."""
    y = sh9_basis(normals.double())  # [P, 9]
    target = linear.double()
    w = torch.ones(y.shape[0], dtype=torch.float64) if weight is None else weight.double().clone()
    ridge = torch.full((9,), _RIDGE, dtype=torch.float64)
    ridge[0] = 0.0
    ridge[4:] = _RIDGE_BAND2
    coeffs = torch.zeros(9, 3, dtype=torch.float64)
    for _ in range(_IRLS_STEPS):
        out = []
        for c in range(3):
            wc = w if coeffs.abs().sum() == 0 else w * _huber_weight(target[:, c] - y @ coeffs[:, c])
            a = (y * wc[:, None]).T @ y
            scale = float(a.diagonal().mean())
            out.append(torch.linalg.solve(a + torch.diag(ridge * scale), (y * wc[:, None]).T @ target[:, c]))
        coeffs = torch.stack(out, 1)
    return coeffs.float()


def _huber_weight(residual: torch.Tensor) -> torch.Tensor:
    r = residual.abs()
    return torch.where(r <= _HUBER, torch.ones_like(r), _HUBER / r.clamp(min=1e-12))


def relative_shading(coeffs: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    """``[P, 3]``: the fitted shading over its average over all directions (its SH DC term)."""
    shading = sh9_basis(normals.to(coeffs.dtype)) @ coeffs
    ambient = (0.282095 * coeffs[0]).clamp(min=1e-6)
    return (shading / ambient).clamp(min=_MIN_SHADING)


def delight(srgb: torch.Tensor, normals: torch.Tensor, weight: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(albedo [P, 3] sRGB in [0, 1], SH coefficients [9, 3])`` of face pixels ``srgb`` with unit ``normals``."""
    linear = srgb_to_linear(srgb.clamp(0.0, 1.0))
    coeffs = fit_sh_light(normals, linear, weight)
    # One shading for all three channels (from the luminance of the fit): seen from the front, each channel's
    # ambient level trades off against its frontal term, and per-channel levels would tint the albedo.
    mono = coeffs @ torch.tensor([0.2126, 0.7152, 0.0722])
    shading = relative_shading(mono[:, None], normals).to(linear)
    # The photo's exposure of the face is the level (see the module docstring): mean shading 1 over the face.
    w = torch.ones(shading.shape[0]) if weight is None else weight.to(shading)
    shading = shading / float((shading[:, 0] * w).sum() / w.sum().clamp(min=1e-12))
    albedo = linear / shading
    return linear_to_srgb(albedo.clamp(0.0, 1.0)), coeffs
