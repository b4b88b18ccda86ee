"""The geometry stage's initialisation as a resumable run step: template -> fitted field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from idto3d.core.atomic import atomic_torch_save, atomic_write_text
from idto3d.core.config import Config, dump_config, load_config
from idto3d.core.errors import IdtoError
from idto3d.geometry.expression_field import ExpressionField, build_field
from idto3d.nn.state import cpu_state_dict
from idto3d.geometry.mesh_io import save_mesh
from idto3d.geometry.template import build_head_template, load_template
from idto3d.geometry.template_fit import FitReport, fit_field_to_mesh
from idto3d.core.progress import progress_bar
from idto3d.render.mesh import Mesh
from idto3d.render.preview import normal_turntable, save_png


def resolve_template(cfg: Config) -> Mesh:
    if cfg.template.path in (None, "", "builtin"):
        return build_head_template(cfg.template.build_resolution)
    return load_template(cfg.template.path)


def write_run_config(run_dir: Path, cfg: Config, overwrite: bool = False) -> None:
    """Write ``config.yaml`` first; refuse to reuse a folder made with a different config."""
    path = run_dir / "config.yaml"
    text = dump_config(cfg)
    if path.exists() and not overwrite and path.read_text(encoding="utf-8") != text:
        raise IdtoError(f"{run_dir} holds a run with a different config; choose another --out, "
                        f"or pass --overwrite to start over there")
    atomic_write_text(path, text)


def run_template_fit(run_dir: str | Path, preset: str | None = None, config_file: str | Path | None = None,
                     overrides: list[str] | None = None, console: Console | None = None,
                     show_progress: bool = True, overwrite: bool = False) -> FitReport:
    """Fit the field to the template, save ``init.pt``, per-expression meshes and a JSON report.

    Re-running on a finished folder with the same config returns the stored report
    without recomputing; a different config is refused unless ``overwrite``.
    """
    run_dir = Path(run_dir)
    cfg = load_config(preset, config_file, overrides)
    # The template is checked before anything is written, so fixing a bad path and
    # re-running is not mistaken for a different run.
    template = resolve_template(cfg)
    write_run_config(run_dir, cfg, overwrite=overwrite)
    done = run_dir / "geometry" / "init_report.json"
    if done.exists() and not overwrite:
        return FitReport(**json.loads(done.read_text(encoding="utf-8")))
    torch.manual_seed(cfg.seed)
    field = build_field(cfg.geometry, n_expressions=len(cfg.expressions), seed=cfg.seed)
    with progress_bar("SDF regression", cfg.template.iterations, console, enabled=show_progress) as update:
        report = fit_field_to_mesh(field, template, cfg.template, seed=cfg.seed,
                                   on_step=lambda step, loss: update(loss=loss))
    save_fitted(run_dir, cfg, field, report)
    return report


def save_fitted(run_dir: Path, cfg: Config, field: ExpressionField, report: FitReport) -> None:
    geo = run_dir / "geometry"
    atomic_torch_save(geo / "init.pt", {"field": cpu_state_dict(field), "expressions": cfg.expressions})
    strips = []
    with torch.no_grad():
        for i, name in enumerate(cfg.expressions):
            mesh = field(i).detach()
            save_mesh(mesh, geo / f"init_{name}.ply")
            strips.append(normal_turntable(mesh, n_views=4, resolution=192))
    # One row per expression (front, side, back, side): what the SDS stage starts from.
    save_png(np.concatenate(strips, axis=0), geo / "init_preview.png")
    # Written last: its presence marks the step as finished.
    atomic_write_text(geo / "init_report.json", json.dumps(report.__dict__, indent=2))
