"""Template initialisation: regress every expression's SDF to a head template mesh.

The paper (section B, following Fantasia3D) starts SDS from a FLAME head obtained
"by regression fitting"; here the field is fitted to any closed template (the
built-in parametric head by default) before the geometry stage begins.

Device: the SDF targets are computed on the host (libigl) and the points each step draws are chosen there
too, from seeded CPU generators, so a fit is the same draw on any device; the pools are moved to the
field's device once, and the steps read nothing back from it but the loss every ``log_every`` steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from idto3d.core.config import TemplateConfig
from idto3d.core.device import reproducible_kernels
from idto3d.geometry.expression_field import ExpressionField
from idto3d.nn.state import field_parameter_groups
from idto3d.geometry.metrics import bbox_diagonal, chamfer_distance
from idto3d.geometry.sdf import mesh_sdf, sample_sdf_training_points
from idto3d.render.mesh import Mesh

# The whole grid is only worth regressing up to this many vertices: beyond it a
# random subset is as good, and libigl's exact SDF costs ~16 us a point.
MAX_GRID_POOL = 400_000


@dataclass
class FitReport:
    chamfer: list[float]  # per expression, in working-space units
    chamfer_relative: list[float]  # as a fraction of the template's bounding-box diagonal
    bbox_diagonal: float
    final_loss: float
    seconds: float
    losses: list[float] = field(default_factory=list)


@dataclass
class SdfPool:
    """Points with exact target SDF, sampled from once per step."""

    near_points: torch.Tensor
    near_sdf: torch.Tensor
    grid_points: torch.Tensor
    grid_sdf: torch.Tensor

    def to(self, device: torch.device | str) -> "SdfPool":
        return SdfPool(*(t.to(device) for t in (self.near_points, self.near_sdf, self.grid_points, self.grid_sdf)))


def build_sdf_pool(template: Mesh, field_: ExpressionField, n_near: int, generator: torch.Generator) -> SdfPool:
    """The pool on the CPU (libigl computes the targets there; ``generator`` is a CPU generator)."""
    near_p, near_s = sample_sdf_training_points(template, n_surface=n_near, n_volume=n_near // 8,
                                                bound=field_.grid_scale, generator=generator)
    grid = field_.grid_vertices.cpu()
    if grid.shape[0] > MAX_GRID_POOL:
        grid = grid[torch.randperm(grid.shape[0], generator=generator)[:MAX_GRID_POOL]]
    # The marched surface only depends on the SDF at grid vertices, so they are
    # regressed directly: near-surface samples alone leave the far field free to
    # create floaters.
    return SdfPool(near_p, near_s, grid, mesh_sdf(template, grid))


def sdf_regression_loss(pred: torch.Tensor, target: torch.Tensor, band: float) -> torch.Tensor:
    """MSE on the SDF, weighted up within a few grid cells of the surface where the mesh is decided."""
    weight = 1.0 + 9.0 * torch.exp(-((target / band) ** 2))
    return (weight * (pred - target) ** 2).mean()


def _host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the device's queued work (a plain copy to CUDA waits).

    Pageable memory is staged by CUDA before the call returns, so the host tensor may be freed right after."""
    return t.to(device, non_blocking=device.type == "cuda")


def _expression_pools(targets: list[Mesh], field_: ExpressionField, n_near: int, gen: torch.Generator,
                      device: torch.device) -> dict[int, SdfPool]:
    """Each expression's pool on ``device``; expressions with the same target mesh share one."""
    pools: dict[int, SdfPool] = {}
    for e, t in enumerate(targets):
        same = next((k for k in pools if targets[k] is t), None)
        pools[e] = pools[same] if same is not None else build_sdf_pool(t, field_, n_near, gen).to(device)
    return pools


@torch.no_grad()
def _chamfers(field_: ExpressionField, targets: list[Mesh], seed: int) -> list[float]:
    """Each expression's Chamfer distance to its target (inf: no surface)."""
    chamfers = []
    for e in range(field_.n_expressions):
        # Measured on the host: the metric samples with a CPU generator and libigl.
        mesh = field_(e).detach().to("cpu")
        chamfers.append(float("inf") if mesh.faces.shape[0] == 0 else chamfer_distance(
            mesh, targets[e], generator=torch.Generator().manual_seed(seed)))
    return chamfers


def fit_field_to_mesh(field_: ExpressionField, template: Mesh | Sequence[Mesh], cfg: TemplateConfig, seed: int = 0,
                      on_step: Callable[[int, float], None] | None = None, *,
                      device: torch.device | str | None = None, log_every: int = 10) -> FitReport:
    """Fit every expression of ``field_`` to ``template`` (in place) and measure the result.

    ``template`` is one mesh for all expressions, or one per expression (e.g. a fitted face's expressions).
    ``device``: where the fit runs (None = where ``field_`` is); the field is moved there and stays there.
    ``on_step(step, loss)`` is called after every step (``step`` from 0); ``loss`` is read from the device
    every ``log_every`` steps and at the last one, and repeats the latest read in between (each read waits
    for the device). ``FitReport.losses`` holds every step's loss, read once at the end. The numbers do not
    depend on ``log_every``.
    """
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every must be a positive number of steps, got {log_every!r}")
    start = time.perf_counter()
    targets = [template] if isinstance(template, Mesh) else list(template)
    if len(targets) not in (1, field_.n_expressions):
        raise ValueError(f"{len(targets)} target meshes for {field_.n_expressions} expressions: give one or one each")
    targets = targets * field_.n_expressions if len(targets) == 1 else targets
    device = field_.grid_vertices.device if device is None else torch.device(device)
    field_.to(device)
    gen = torch.Generator().manual_seed(seed)
    pools = _expression_pools(targets, field_, max(4 * cfg.points_per_step, 50_000), gen, device)
    opt = torch.optim.Adam(field_parameter_groups(field_, cfg.lr), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.iterations, 1), eta_min=cfg.lr * 0.05)
    band = 2.0 * field_.edge_length
    n_near_step = int(round(cfg.points_per_step * cfg.surface_fraction))
    n_grid = cfg.points_per_step - n_near_step
    history = torch.empty(cfg.iterations, device=device)
    latest = float("nan")
    with reproducible_kernels(device):
        for step in range(cfg.iterations):
            expression = step % field_.n_expressions
            pool = pools[expression]
            i_near = _host_to_device(torch.randint(0, pool.near_points.shape[0], (n_near_step,), generator=gen), device)
            i_grid = _host_to_device(torch.randint(0, pool.grid_points.shape[0], (n_grid,), generator=gen), device)
            pts = torch.cat([pool.near_points[i_near], pool.grid_points[i_grid]])
            target = torch.cat([pool.near_sdf[i_near], pool.grid_sdf[i_grid]])
            sdf, raw_offset = field_.query(pts, expression)
            # Offsets stay ~0 during initialisation; the SDS stage is what moves vertices.
            loss = sdf_regression_loss(sdf, target, band) + 1e-3 * raw_offset.square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            history[step] = loss.detach()
            if on_step is not None:
                if step % log_every == 0 or step == cfg.iterations - 1:
                    latest = float(history[step])
                on_step(step, latest)
    losses = history.tolist()
    diag = bbox_diagonal(targets[0])
    chamfers = _chamfers(field_, targets, seed)
    return FitReport(chamfer=chamfers, chamfer_relative=[c / diag for c in chamfers], bbox_diagonal=diag,
                     final_loss=losses[-1] if losses else float("nan"), seconds=time.perf_counter() - start,
                     losses=losses)
