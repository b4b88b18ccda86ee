"""Drive the geometry SDS stage cheaply from tests that check one property of it (the Laplacian term, atomic
checkpoints): a field regressed (a few seconds of Adam) to a sphere's closed-form SDF instead of a template fit,
zero or oracle guidance, and ``run_geometry``, which prepares the run folder and its initial field as
``generate`` does and runs the stage.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch

from idto3d.core.config import Config, GuidanceConfig, load_config
from idto3d.geometry.expression_field import ExpressionField, build_field
from idto3d.priors.guidance import OracleGuidance

# One expression (each iteration then optimises the same mesh), a 16-cell grid, 64 px renders, no previews
# or checkpoints but the final ones.
FAST = ["expressions=[neutral]", "geometry.grid_resolution=16", "render.resolution=64",
        "prior.guidance.latent_size=8", "geometry.iterations=3", "geometry.checkpoint_every=1000",
        "geometry.preview_every=1000", "runtime.device=cpu", "runtime.log_every=1"]


def stage_config(extra: list[str] | None = None) -> Config:
    return load_config("preview", None, FAST + (extra or []))


_FIELDS: dict[tuple, dict] = {}


def sphere_field(cfg: Config, radius: float = 0.45, steps: int = 60) -> ExpressionField:
    """``build_field`` for ``cfg``, its SDF regressed at the grid vertices to a sphere (Adam, a second or two),
    then perturbed a little so the surface is not already smooth. Cached per geometry config; a fresh copy each
    call (the stage optimises it in place)."""
    g = cfg.geometry  # what build_field reads (not the stage's own settings: lr, weights, iterations)
    key = (g.grid_resolution, g.grid_scale, repr(g.encoding), repr(g.field), len(cfg.expressions), cfg.seed,
           radius, steps)
    if key not in _FIELDS:
        field = build_field(cfg.geometry, n_expressions=len(cfg.expressions), seed=cfg.seed)
        target = field.grid_vertices.norm(dim=-1) - radius
        opt = torch.optim.Adam(field.parameters(), lr=1e-2)
        for _ in range(steps):
            for e in range(field.n_expressions):
                opt.zero_grad()
                sdf, raw = field.query(field.grid_vertices, e)
                # SDF to the sphere, and random-looking but fixed offsets: a bumpy surface to smooth.
                bumps = 0.6 * torch.sin(7.0 * field.grid_vertices[:, [1, 2, 0]])
                loss = (sdf - target).square().mean() + (raw - bumps).square().mean()
                loss.backward()
                opt.step()
        with torch.no_grad():
            mesh = field(0)
        assert mesh.faces.shape[0] > 100, "the sphere fit left no surface"
        _FIELDS[key] = copy.deepcopy(field.state_dict())
    field = build_field(cfg.geometry, n_expressions=len(cfg.expressions), seed=cfg.seed)
    field.load_state_dict(_FIELDS[key])
    return field


def oracle_guidance(cfg: Config) -> OracleGuidance:
    """SDS toward a fixed target (a bright square on white): a non-zero, deterministic SDS gradient."""
    target = torch.full((1, 4, 64, 64), 1.0)
    target[:, :3, 16:48, 16:48] = 0.3
    gcfg = GuidanceConfig(latent_mode="downsample", latent_size=16)
    return OracleGuidance(target, gcfg, "geometry", cfg.geometry.iterations, seed=cfg.seed)


class ZeroGuidance(OracleGuidance):
    """The oracle's interface and random draws, but a loss of exactly zero gradient (0 x the oracle's loss): the
    geometry stage then has nothing but its own regulariser to move the field."""

    def __call__(self, images, cond, step):  # noqa: ANN001
        out = super().__call__(images, cond, step)
        return dataclasses.replace(out, loss=out.loss * 0.0)


def zero_guidance(cfg: Config) -> ZeroGuidance:
    gcfg = GuidanceConfig(latent_mode="downsample", latent_size=16)
    return ZeroGuidance(torch.full((1, 4, 64, 64), 1.0), gcfg, "geometry", cfg.geometry.iterations, seed=cfg.seed)


def run_geometry(run_dir: Path, cfg: Config, guidance, field: ExpressionField, **kwargs):  # noqa: ANN001
    """Run the geometry stage from ``field``, which becomes the run's ``geometry/init.pt`` unless the folder has
    one (so a resumed run starts from the same field, through ``ensure_init`` as ``generate`` does)."""
    from idto3d.core.atomic import atomic_torch_save, atomic_write_text
    from idto3d.core.run_layout import RunLayout
    from idto3d.nn.state import cpu_state_dict
    from idto3d.stages.geometry_stage import run_geometry_stage
    from idto3d.stages.initial_geometry import ensure_init
    from idto3d.stages.run_folder import prepare_run

    layout = RunLayout(prepare_run(run_dir, cfg))
    if not layout.init_field.exists():
        atomic_torch_save(layout.init_field, {"field": cpu_state_dict(field), "expressions": list(cfg.expressions)})
        atomic_write_text(layout.init_report, json.dumps({"note": "field written by the test"}))
    kwargs.setdefault("progress", False)
    return run_geometry_stage(layout.root, cfg, guidance, ensure_init(layout.root, cfg, progress=False), **kwargs)


def read_log(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "geometry" / "log.jsonl"
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]

