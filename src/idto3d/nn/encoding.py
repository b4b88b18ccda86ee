"""Positional encodings of 3D points for the geometry field.

All encoders take points in ``[-bound, bound]^3`` (the tet grid's cube), map them to ``[0, 1]^3``
(points outside are clamped to the border) and return ``[N, output_dim]`` features.

- :class:`HashGridEncoding`: the paper's Instant-NGP multiresolution hash encoding, in pure
  PyTorch so it runs (and is tested) on CPU. About 0.5 s fwd+bwd for 100k points at 16 levels /
  2^19 entries on 2 idle CPU cores (0.7 s when gradients also flow to the points).
- :class:`DenseGridEncoding`: a few dense feature volumes sampled with ``grid_sample``; about
  0.4 s for the same 100k points at its defaults (4 levels x 8 features, 16..128), no hashing,
  and simple to reason about; the ``preview`` preset's choice.
Neither supports double backward (no eikonal-style gradient penalties through them).
- :class:`TcnnHashGridEncoding`: the same hash grid through tiny-cuda-nn's fused CUDA kernels; an
  opt-in fast path (``runtime.fast_paths``), used only when asked for and ``tinycudann`` imports
  with CUDA present. The PyTorch grid stays the default and the reference; ``tests/test_fast_paths.py``
  compares the two where tiny-cuda-nn is installed.

The two hash grids' parameters are not interchangeable (different layouts), so a checkpoint names
its implementation through its keys: :func:`check_encoding_state` turns a mismatch into a clear error.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from idto3d.core.errors import ConfigError, IdtoError

__all__ = [
    "HashGridEncoding",
    "DenseGridEncoding",
    "TcnnHashGridEncoding",
    "tcnn_available",
    "make_encoding",
    "encoding_from_config",
    "encoding_implementation",
    "state_encoding_implementation",
    "check_encoding_state",
    "ENCODING_KINDS",
    "level_resolutions",
]

ENCODING_KINDS = ("hash", "dense")

# Instant-NGP's spatial-hash primes (the x prime is 1 so the finest axis stays coherent in memory).
_PRIMES = (1, 2654435761, 805459861)
_INIT_RANGE = 1e-4


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
        high is not None and value > high
    ):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"encoding {name} must be an integer {bounds}, got {value!r}")
    return value


def _check_common(n_levels: object, n_features_per_level: object, base_resolution: object,
                  max_resolution: object, bound: object) -> None:
    _check_int("n_levels", n_levels, 1, 64)
    _check_int("n_features_per_level", n_features_per_level, 1, 64)
    _check_int("base_resolution", base_resolution, 2)
    _check_int("max_resolution", max_resolution, 2)
    if max_resolution < base_resolution:  # type: ignore[operator]
        raise ConfigError(
            f"encoding max_resolution ({max_resolution}) must be >= base_resolution "
            f"({base_resolution})"
        )
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0:
        raise ConfigError(f"encoding bound must be a positive number, got {bound!r}")


def level_resolutions(n_levels: int, base_resolution: int, max_resolution: int) -> list[int]:
    """Grid points per axis of each level, geometric from base to max (Instant-NGP eq. 2-3)."""
    if n_levels == 1:
        return [base_resolution]
    growth = math.exp((math.log(max_resolution) - math.log(base_resolution)) / (n_levels - 1))
    # growth**level can land just below an integer (2047.9999...); the epsilon stops the floor
    # from dropping a level to one point fewer than intended.
    return [int(math.floor(base_resolution * growth**level + 1e-6)) for level in range(n_levels)]


def _to_unit_cube(x: torch.Tensor, bound: float) -> torch.Tensor:
    if x.ndim != 2 or x.shape[-1] != 3:
        raise ValueError(f"expected points of shape [N, 3], got {tuple(x.shape)}")
    return ((x + bound) / (2.0 * bound)).clamp(0.0, 1.0)


class _LevelGather(torch.autograd.Function):
    """``out[f, l, n] = sum_k w[l, k, n] * table[f, idx[l, k, n]]`` with a hand-written backward.

    Autograd's backward for indexing (``index_put`` with accumulate, or
    ``embedding_dense_backward``) is several times slower on CPU than a 1-D ``index_add_`` per
    feature, and the gathers/scatters dominate the hash grid's cost.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        flat = idx.reshape(-1)
        feats = [t.index_select(0, flat).view_as(w) for t in table]  # F x [L, K, N]
        out = torch.stack([(f * w).sum(1) for f in feats])  # [F, L, N]
        ctx.save_for_backward(table, idx, w, *(feats if ctx.needs_input_grad[2] else ()))
        return out

    @staticmethod
    @once_differentiable  # saved gathers are detached: a second derivative would be silently wrong
    def backward(ctx, grad_out: torch.Tensor):
        table, idx, w, *feats = ctx.saved_tensors
        grad_table = grad_w = None
        if ctx.needs_input_grad[0]:
            flat = idx.reshape(-1)
            grad_table = torch.zeros_like(table)
            for f in range(table.shape[0]):
                grad_table[f].index_add_(0, flat, (w * grad_out[f].unsqueeze(1)).reshape(-1))
        if ctx.needs_input_grad[2]:
            grad_w = sum(f * g.unsqueeze(1) for f, g in zip(feats, grad_out))
        return grad_table, None, grad_w


def _corner_combine(per_axis: torch.Tensor, op, out: torch.Tensor) -> None:
    """Combine per-axis terms ``[L, 3, 2, N]`` into 8 corners, written to ``out [L, 2, 2, 2, N]``.

    Corner ``(dx, dy, dz)`` is ``op(op(x[dx], y[dy]), z[dz])``; ``N`` stays innermost so both
    broadcasts vectorise.
    """
    xy = op(per_axis[:, 0, :, None, None], per_axis[:, 1, None, :, None])
    op(xy, per_axis[:, 2, None, None, :], out=out)


class HashGridEncoding(nn.Module):
    """Instant-NGP multiresolution hash encoding (Müller et al. 2022) in pure PyTorch.

    Level ``l`` is a grid of ``R_l`` points per axis (geometric between ``base_resolution`` and
    ``max_resolution``) over the unit cube. Its features live in a table of
    ``min(2^log2_hashmap_size, R_l^3)`` rows: indexed directly while the dense grid fits, else
    through the spatial hash ``(x * 1) xor (y * 2654435761) xor (z * 805459861) mod T``. A point's
    feature per level is the trilinear blend of its cell's 8 corners; levels are concatenated
    coarse to fine, ``F`` features per level.

    All levels share one parameter ``table [F, rows]`` (feature-major, so each feature is a 1-D
    gather) and are evaluated together, level-major: each level's slice of the table stays hot in
    cache while its points are gathered. Hashed levels sit first in the table at multiples of
    ``T`` so their offset can be OR-ed into the hash instead of added per corner.
    """

    def __init__(self, n_levels: int = 16, n_features_per_level: int = 2,
                 log2_hashmap_size: int = 19, base_resolution: int = 16,
                 max_resolution: int = 2048, bound: float = 1.0) -> None:
        super().__init__()
        _check_common(n_levels, n_features_per_level, base_resolution, max_resolution, bound)
        _check_int("log2_hashmap_size", log2_hashmap_size, 4, 30)
        self.n_levels = n_levels
        self.n_features_per_level = n_features_per_level
        self.log2_hashmap_size = log2_hashmap_size
        self.base_resolution = base_resolution
        self.max_resolution = max_resolution
        self.bound = float(bound)
        self.output_dim = n_levels * n_features_per_level

        table_size = 2**log2_hashmap_size
        self.resolutions = level_resolutions(n_levels, base_resolution, max_resolution)
        # Resolutions only grow, so the directly indexed levels are the first ones.
        self.n_dense_levels = sum(r**3 <= table_size for r in self.resolutions)
        n_hash = n_levels - self.n_dense_levels
        dense_sizes = [r**3 for r in self.resolutions[: self.n_dense_levels]]
        dense_offsets = [n_hash * table_size + sum(dense_sizes[:i])
                         for i in range(len(dense_sizes))]
        hash_offsets = [i * table_size for i in range(n_hash)]
        n_rows = n_hash * table_size + sum(dense_sizes)
        self._index_dtype = torch.int32 if n_rows < 2**31 else torch.int64

        res = torch.tensor(self.resolutions, dtype=torch.int64)
        self.register_buffer("_cells", (res - 1).to(torch.float32)[:, None, None], persistent=False)
        self.register_buffer("_max_corner", (res - 2)[:, None, None], persistent=False)
        # Per-axis multipliers: dense levels use strides (1, R, R^2), hashed levels the primes.
        mult = torch.tensor(_PRIMES).repeat(n_levels, 1)
        mult[: self.n_dense_levels, 1] = res[: self.n_dense_levels]
        mult[: self.n_dense_levels, 2] = res[: self.n_dense_levels] ** 2
        self.register_buffer("_mult", mult[:, :, None, None], persistent=False)  # [L, 3, 1, 1]
        offsets = torch.tensor(dense_offsets + hash_offsets, dtype=torch.int64)
        self.register_buffer("_offsets", offsets[:, None, None], persistent=False)  # [L, 1, 1]
        self._hash_mask = table_size - 1
        self._level_rows = [
            (off, off + (r**3 if level < self.n_dense_levels else table_size))
            for level, (off, r) in enumerate(zip(offsets.tolist(), self.resolutions))
        ]

        self.table = nn.Parameter(
            torch.empty(n_features_per_level, n_rows).uniform_(-_INIT_RANGE, _INIT_RANGE)
        )

    def extra_repr(self) -> str:
        return (f"levels={self.n_levels}, features={self.n_features_per_level}, "
                f"log2_T={self.log2_hashmap_size}, resolutions={self.resolutions[0]}..."
                f"{self.resolutions[-1]}, bound={self.bound}")

    def level_table(self, level: int) -> torch.Tensor:
        """A view ``[rows, F]`` of one level's features (row = direct or hashed corner index)."""
        start, stop = self._level_rows[level]
        return self.table[:, start:stop].t()

    def _corner_indices(self, corner: torch.Tensor) -> torch.Tensor:
        """Table rows ``[L, 8, N]`` of each cell's corners, from its low corner ``[L, 3, N]``."""
        n = corner.shape[-1]
        terms = torch.stack([corner, corner + 1], dim=2) * self._mult  # [L, 3, 2, N]
        ld = self.n_dense_levels
        # int64 products cannot overflow (coords < 2^31, primes < 2^32); masking before the xor
        # is the same as after it, and gives the rows of Instant-NGP's wrapping uint32 hash.
        terms[ld:] &= self._hash_mask
        # Fold each level's table offset into the x term: added for dense levels, OR-ed for hashed
        # ones (their offsets are multiples of T, above the masked bits, so OR commutes with xor).
        terms[:, 0] += self._offsets
        terms = terms.to(self._index_dtype)
        idx = torch.empty((self.n_levels, 2, 2, 2, n), dtype=self._index_dtype,
                          device=corner.device)
        if ld > 0:
            _corner_combine(terms[:ld], torch.add, idx[:ld])
        if ld < self.n_levels:
            _corner_combine(terms[ld:], torch.bitwise_xor, idx[ld:])
        return idx.view(self.n_levels, 8, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        u = _to_unit_cube(x.to(self.table.dtype), self.bound).t()  # [3, N]
        pos = u.unsqueeze(0) * self._cells  # [L, 3, N]
        with torch.no_grad():
            # Clamp so points on the far face use the last cell (with weight 1 on its far corner).
            corner = torch.minimum(pos.floor().long(), self._max_corner)
            idx = self._corner_indices(corner)
        frac = pos - corner
        w = torch.stack([1.0 - frac, frac], dim=2)  # [L, 3, 2, N]
        w = w[:, 0, :, None, None] * w[:, 1, None, :, None] * w[:, 2, None, None, :]
        out = _LevelGather.apply(self.table, idx, w.reshape(self.n_levels, 8, n))  # [F, L, N]
        return out.permute(2, 1, 0).reshape(n, self.output_dim)


class DenseGridEncoding(nn.Module):
    """Multi-resolution dense feature volumes, trilinearly sampled with ``F.grid_sample``.

    Level ``l`` is a ``[F, R_l, R_l, R_l]`` volume (``R_l`` geometric between ``base_resolution``
    and ``max_resolution``; corners aligned with the cube's faces). It trades the hash grid's
    memory efficiency for speed on CPU: no hashing, one fused sampling kernel per level.
    """

    def __init__(self, n_levels: int = 4, n_features_per_level: int = 8,
                 base_resolution: int = 16, max_resolution: int = 128,
                 bound: float = 1.0) -> None:
        super().__init__()
        _check_common(n_levels, n_features_per_level, base_resolution, max_resolution, bound)
        self.n_levels = n_levels
        self.n_features_per_level = n_features_per_level
        self.base_resolution = base_resolution
        self.max_resolution = max_resolution
        self.bound = float(bound)
        self.output_dim = n_levels * n_features_per_level
        self.resolutions = level_resolutions(n_levels, base_resolution, max_resolution)
        self.volumes = nn.ParameterList(
            nn.Parameter(torch.empty(1, n_features_per_level, r, r, r)
                         .uniform_(-_INIT_RANGE, _INIT_RANGE))
            for r in self.resolutions
        )

    def extra_repr(self) -> str:
        return (f"levels={self.n_levels}, features={self.n_features_per_level}, "
                f"resolutions={self.resolutions}, bound={self.bound}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        dtype = self.volumes[0].dtype
        # grid_sample wants [-1, 1] coordinates ordered (W, H, D); volume axis (D, H, W) = (x, y, z)
        # so the last coordinate must be x.
        g = (_to_unit_cube(x.to(dtype), self.bound) * 2.0 - 1.0).flip(-1).reshape(1, 1, 1, n, 3)
        out = [
            F.grid_sample(vol, g, mode="bilinear", padding_mode="border", align_corners=True)
            .reshape(self.n_features_per_level, n)
            for vol in self.volumes
        ]
        return torch.cat(out, dim=0).t()


def tcnn_available() -> bool:
    """Whether tiny-cuda-nn can be used: it imports and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import tinycudann  # noqa: F401
    except Exception:  # a broken CUDA build raises OSError/RuntimeError, not just ImportError
        return False
    return True


class TcnnHashGridEncoding(nn.Module):
    """The hash grid through tiny-cuda-nn (CUDA only; same arguments as :class:`HashGridEncoding`).

    Parameters live on the CUDA device (float32, like every 3-D parameter here) and inputs must be
    CUDA tensors. Output is float32. Differences from the PyTorch version: tcnn offsets each level's
    grid by half a cell and rounds resolutions its own way, so checkpoints are not interchangeable
    between the two (see :func:`check_encoding_state`).
    """

    def __init__(self, n_levels: int = 16, n_features_per_level: int = 2,
                 log2_hashmap_size: int = 19, base_resolution: int = 16,
                 max_resolution: int = 2048, bound: float = 1.0) -> None:
        super().__init__()
        _check_common(n_levels, n_features_per_level, base_resolution, max_resolution, bound)
        _check_int("log2_hashmap_size", log2_hashmap_size, 4, 30)
        if not tcnn_available():
            raise ConfigError(
                "TcnnHashGridEncoding needs tinycudann and a CUDA device; use "
                "make_encoding('hash', prefer_tcnn=False) for the PyTorch hash grid"
            )
        import tinycudann as tcnn

        growth = 1.0 if n_levels == 1 else math.exp(
            (math.log(max_resolution) - math.log(base_resolution)) / (n_levels - 1))
        self.n_levels = n_levels
        self.n_features_per_level = n_features_per_level
        self.log2_hashmap_size = log2_hashmap_size
        self.base_resolution = base_resolution
        self.max_resolution = max_resolution
        self.bound = float(bound)
        self.output_dim = n_levels * n_features_per_level
        self.encoding = tcnn.Encoding(3, {
            "otype": "HashGrid",
            "n_levels": n_levels,
            "n_features_per_level": n_features_per_level,
            "log2_hashmap_size": log2_hashmap_size,
            "base_resolution": base_resolution,
            "per_level_scale": growth,
        }, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoding(_to_unit_cube(x, self.bound).contiguous()).float()


def make_encoding(kind: str, prefer_tcnn: bool = False, **kwargs: object) -> nn.Module:
    """Build an encoding by name: ``"hash"`` or ``"dense"``; ``kwargs`` go to its constructor.

    ``"hash"`` is the PyTorch :class:`HashGridEncoding` unless ``prefer_tcnn`` (the opt-in fast path)
    and :func:`tcnn_available`; then tiny-cuda-nn's. Unknown kinds or arguments raise ``ConfigError``.
    """
    if kind == "hash":
        cls: type[nn.Module] = (
            TcnnHashGridEncoding if prefer_tcnn and tcnn_available() else HashGridEncoding
        )
    elif kind == "dense":
        cls = DenseGridEncoding
    else:
        raise ConfigError(
            f"unknown encoding kind {kind!r}; expected one of {', '.join(ENCODING_KINDS)}"
        )
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ConfigError(
            f"encoding {kind!r} does not take {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )
    return cls(**kwargs)


def encoding_from_config(cfg, bound: float, prefer_tcnn: bool = False) -> nn.Module:  # noqa: ANN001
    """The encoding an ``idto3d.core.config.EncodingConfig`` describes, covering ``[-bound, bound]^3``;
    ``prefer_tcnn`` as in :func:`make_encoding` (the stages pass ``runtime.fast_paths``)."""
    kwargs: dict = dict(n_levels=cfg.n_levels, n_features_per_level=cfg.n_features_per_level,
                        base_resolution=cfg.base_resolution, max_resolution=cfg.max_resolution, bound=bound)
    if cfg.kind == "hash":
        kwargs["log2_hashmap_size"] = cfg.log2_hashmap_size
    return make_encoding(cfg.kind, prefer_tcnn=prefer_tcnn, **kwargs)


# ---------------------------------------------------------------- checkpoints

# What each implementation's parameters are called under the encoding's prefix: tiny-cuda-nn keeps
# one flat ``params`` vector in its ``tcnn.Encoding`` (our ``.encoding``), the PyTorch grids their tables.
_STATE_KEYS = {"tcnn-hash": ("encoding.params",), "hash": ("table",), "dense": ("volumes.",)}
_DESCRIBED = {"tcnn-hash": "tiny-cuda-nn's hash grid (runtime.fast_paths on, CUDA with tinycudann)",
              "hash": "the PyTorch hash grid", "dense": "the dense grid"}


def encoding_implementation(encoding: nn.Module) -> str:
    """``"hash"``, ``"tcnn-hash"`` or ``"dense"``: which grid ``encoding`` is."""
    if isinstance(encoding, TcnnHashGridEncoding):
        return "tcnn-hash"
    if isinstance(encoding, HashGridEncoding):
        return "hash"
    if isinstance(encoding, DenseGridEncoding):
        return "dense"
    raise TypeError(f"not an idto3d encoding: {type(encoding).__name__}")


def state_encoding_implementation(state: dict, prefix: str = "encoding.") -> str | None:
    """Which grid a field's ``state_dict`` was saved from (keys under ``prefix``); None if none matches."""
    keys = [k[len(prefix):] for k in state if k.startswith(prefix)]
    for name, marks in _STATE_KEYS.items():
        if any(k.startswith(m) for k in keys for m in marks):
            return name
    return None


def check_encoding_state(encoding: nn.Module, state: dict, source: str, prefix: str = "encoding.") -> None:
    """Raise ``IdtoError`` when ``state`` (a field's state_dict, ``source`` names where it came from) holds
    another grid implementation than ``encoding``: a tiny-cuda-nn checkpoint cannot load into the PyTorch
    grid or vice versa, and torch's own message (missing/unexpected keys) would not say why."""
    ours, theirs = encoding_implementation(encoding), state_encoding_implementation(state, prefix)
    if theirs is None or theirs == ours:
        return
    if "tcnn-hash" in (ours, theirs):
        on = theirs == "tcnn-hash"
        fix = ("set runtime.fast_paths=true and resume on a CUDA machine with tinycudann installed"
               if on else "set runtime.fast_paths=false")
        raise IdtoError(f"{source} was saved with {_DESCRIBED[theirs]}, but this run builds {_DESCRIBED[ours]}; "
                        f"their parameters are not interchangeable: {fix}, or pass --overwrite to start over")
    raise IdtoError(f"{source} was saved with {_DESCRIBED[theirs]}, but this run's config builds {_DESCRIBED[ours]} "
                    "(encoding.kind differs); use the run's own config, or pass --overwrite to start over")
