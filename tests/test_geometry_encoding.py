"""Claims about the positional encodings (hash grid, dense grid, factory)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from idto3d.core.errors import ConfigError
from idto3d.nn.encoding import (
    DenseGridEncoding, HashGridEncoding, TcnnHashGridEncoding, level_resolutions, make_encoding, tcnn_available,
)

# Resolutions 4, 8, 16, 32 with T = 2^10: the first two levels are indexed directly, the rest hashed.
SMALL_HASH = dict(n_levels=4, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4,
                  max_resolution=32, bound=0.8)
SMALL_DENSE = dict(n_levels=3, n_features_per_level=4, base_resolution=4, max_resolution=16,
                   bound=0.8)


def _points(n: int, bound: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, generator=g) * 2 - 1) * bound


def _reference_hash_encoding(enc: HashGridEncoding, x: torch.Tensor) -> torch.Tensor:
    """Instant-NGP, one point, level and corner at a time, with uint32 hash arithmetic."""
    t = 2**enc.log2_hashmap_size
    out = torch.zeros(x.shape[0], enc.output_dim, dtype=torch.float64)
    u = ((x.double() + enc.bound) / (2 * enc.bound)).clamp(0, 1)
    for level, r in enumerate(enc.resolutions):
        table = enc.level_table(level).detach().double()
        for p in range(x.shape[0]):
            pos = u[p] * (r - 1)
            c0 = [min(int(math.floor(v)), r - 2) for v in pos.tolist()]
            frac = [pos[i].item() - c0[i] for i in range(3)]
            for d in itertools.product((0, 1), repeat=3):
                cx, cy, cz = (c0[i] + d[i] for i in range(3))
                if r**3 <= t:
                    row = cx + cy * r + cz * r * r
                else:
                    row = ((cx * 1) ^ (cy * 2654435761) ^ (cz * 805459861)) % 2**32 % t
                w = math.prod(frac[i] if d[i] else 1 - frac[i] for i in range(3))
                f = enc.n_features_per_level
                out[p, level * f : (level + 1) * f] += w * table[row]
    return out


def _fit(encoding: nn.Module, steps: int, lr: float) -> tuple[float, float]:
    """Fit encoding + linear head to a smooth 3D function; return (initial, final) held-out MSE."""
    torch.manual_seed(0)
    bound = encoding.bound

    def target(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(3 * x[:, :1]) * torch.cos(2 * x[:, 1:2]) + x[:, 2:] ** 2

    head = nn.Linear(encoding.output_dim, 1)
    test_x = _points(2048, bound, seed=1)

    def test_mse() -> float:
        with torch.no_grad():
            return float(((head(encoding(test_x)) - target(test_x)) ** 2).mean())

    before = test_mse()
    opt = torch.optim.Adam([*encoding.parameters(), *head.parameters()], lr=lr)
    for step in range(steps):
        x = _points(2048, bound, seed=100 + step)
        loss = ((head(encoding(x)) - target(x)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, test_mse()


# --- hash grid ------------------------------------------------------------------------------

def test_level_resolutions_grow_geometrically_from_base_to_max():
    res = level_resolutions(16, 16, 2048)
    assert res[0] == 16 and res[-1] == 2048 and len(res) == 16
    assert all(a < b for a, b in zip(res, res[1:]))
    assert level_resolutions(1, 16, 2048) == [16]


def test_hash_grid_output_shape_and_dim():
    enc = HashGridEncoding(**SMALL_HASH)
    assert enc.output_dim == 8
    y = enc(_points(1000, 0.8))
    assert y.shape == (1000, 8) and y.dtype == torch.float32
    assert enc.n_dense_levels == 2


def test_hash_grid_defaults_match_instant_ngp_table_sizes():
    enc = HashGridEncoding()
    assert enc.output_dim == 32
    # 16 levels; coarse levels stored densely while they fit in 2^19 rows, the rest hashed.
    expected = sum(min(2**19, r**3) for r in enc.resolutions)
    assert enc.table.numel() == expected * 2


def test_hash_grid_matches_a_per_point_reference_implementation():
    torch.manual_seed(0)
    enc = HashGridEncoding(**SMALL_HASH)
    with torch.no_grad():
        enc.table.uniform_(-1, 1)  # large values so a wrong row or weight cannot hide
    x = torch.cat([_points(40, 0.8), torch.tensor([[0.8, 0.8, 0.8], [-0.8, -0.8, -0.8],
                                                    [0.8, -0.8, 0.0], [2.0, -3.0, 0.1]])])
    assert torch.allclose(enc(x).double(), _reference_hash_encoding(enc, x), atol=1e-5)


def test_hash_grid_is_deterministic_under_a_seed():
    torch.manual_seed(3)
    a = HashGridEncoding(**SMALL_HASH)
    torch.manual_seed(3)
    b = HashGridEncoding(**SMALL_HASH)
    x = _points(500, 0.8)
    assert torch.equal(a.table, b.table)
    assert torch.equal(a(x), b(x))
    assert a.table.abs().max() <= 1e-4  # Instant-NGP's U(-1e-4, 1e-4) init


def test_hash_grid_gradients_reach_the_table_and_match_finite_differences_for_points():
    torch.manual_seed(0)
    enc = HashGridEncoding(**SMALL_HASH).double()
    with torch.no_grad():
        enc.table.uniform_(-1, 1)
    x = _points(6, 0.7).double().requires_grad_(True)
    # Through the hand-written backward: d features / d point (trilinear weights).
    assert torch.autograd.gradcheck(enc, (x,), eps=1e-6, atol=1e-6)
    y = enc(x.detach())
    (y * torch.randn_like(y)).sum().backward()
    assert enc.table.grad is not None and torch.isfinite(enc.table.grad).all()
    # 6 points x 4 levels x 8 corners touch at most 192 rows per feature.
    assert 0 < int((enc.table.grad[0] != 0).sum()) <= 192


def test_hash_grid_table_gradient_matches_finite_differences():
    torch.manual_seed(0)
    enc = HashGridEncoding(**SMALL_HASH).double()
    x = _points(5, 0.7).double()
    weights = torch.randn(5, enc.output_dim, dtype=torch.float64)
    (enc(x) * weights).sum().backward()
    grad = enc.table.grad
    rows = torch.nonzero(grad).tolist()[:6]
    assert rows
    for f, r in rows:
        with torch.no_grad():
            enc.table[f, r] += 1e-6
            plus = (enc(x) * weights).sum()
            enc.table[f, r] -= 2e-6
            minus = (enc(x) * weights).sum()
            enc.table[f, r] += 1e-6
        assert grad[f, r].item() == pytest.approx(((plus - minus) / 2e-6).item(), rel=1e-5)


def test_hash_grid_fits_a_smooth_3d_function():
    before, after = _fit(HashGridEncoding(**SMALL_HASH), steps=200, lr=3e-2)
    assert after < before / 10, (before, after)


@pytest.mark.parametrize("kwargs", [
    dict(n_levels=0), dict(n_features_per_level=0), dict(log2_hashmap_size=2),
    dict(base_resolution=1), dict(base_resolution=64, max_resolution=32), dict(bound=0.0),
    dict(n_levels=2.5),
])
def test_bad_hash_grid_arguments_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        HashGridEncoding(**kwargs)


# --- dense grid -----------------------------------------------------------------------------

def test_dense_grid_output_shape_and_dim():
    enc = DenseGridEncoding(**SMALL_DENSE)
    assert enc.output_dim == 12
    assert enc.resolutions == [4, 8, 16]
    assert enc(_points(300, 0.8)).shape == (300, 12)


def test_dense_grid_reproduces_linear_fields_so_its_axes_are_x_y_z():
    enc = DenseGridEncoding(n_levels=1, n_features_per_level=3, base_resolution=5,
                            max_resolution=5, bound=2.0)
    ticks = torch.linspace(-2, 2, 5)
    gx, gy, gz = torch.meshgrid(ticks, ticks, ticks, indexing="ij")
    with torch.no_grad():
        enc.volumes[0].copy_(torch.stack([gx, gy, 3 * gz])[None])
    x = _points(200, 2.0)
    expected = torch.stack([x[:, 0], x[:, 1], 3 * x[:, 2]], dim=1)
    assert torch.allclose(enc(x), expected, atol=1e-5)


def test_dense_grid_is_deterministic_and_gradients_reach_the_volumes():
    torch.manual_seed(5)
    a = DenseGridEncoding(**SMALL_DENSE)
    torch.manual_seed(5)
    b = DenseGridEncoding(**SMALL_DENSE)
    x = _points(400, 0.8).requires_grad_(True)
    assert torch.equal(a(x), b(x))
    a(x).square().sum().backward()
    for vol in a.volumes:
        assert vol.grad is not None and vol.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_dense_grid_fits_a_smooth_3d_function():
    before, after = _fit(DenseGridEncoding(**SMALL_DENSE), steps=200, lr=3e-2)
    assert after < before / 10, (before, after)


# --- factory --------------------------------------------------------------------------------

def test_make_encoding_builds_each_kind():
    assert isinstance(make_encoding("dense", **SMALL_DENSE), DenseGridEncoding)
    enc = make_encoding("hash", prefer_tcnn=False, **SMALL_HASH)
    assert isinstance(enc, HashGridEncoding)
    if not tcnn_available():
        assert isinstance(make_encoding("hash", **SMALL_HASH), HashGridEncoding)


def test_make_encoding_unknown_kind_raises_config_error_listing_the_choices():
    with pytest.raises(ConfigError, match="hash.*dense"):
        make_encoding("fourier")


def test_make_encoding_rejects_arguments_the_kind_does_not_take():
    with pytest.raises(ConfigError, match="log2_hashmap_size"):
        make_encoding("dense", log2_hashmap_size=19)


@pytest.mark.skipif(tcnn_available(), reason="only meaningful without tiny-cuda-nn + CUDA")
def test_tcnn_encoding_without_cuda_raises_config_error():
    with pytest.raises(ConfigError, match="tinycudann"):
        TcnnHashGridEncoding(**SMALL_HASH)
