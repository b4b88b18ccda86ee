"""Run-folder steps shared by the stages: config first, start-over on ``overwrite``, the fitted initial field."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console

from idto3d.core.config import Config, dump_config
from idto3d.core.errors import IdtoError
from idto3d.geometry.expression_field import ExpressionField, build_field
from idto3d.nn.state import load_field_state
from idto3d.geometry.template_fit import fit_field_to_mesh
from idto3d.stages.template_init import resolve_template, save_fitted, write_run_config
from idto3d.core.progress import progress_bar
from idto3d.render.mesh import Mesh

# Outputs derived from the config: removed when a run starts over, so no stale checkpoint is resumed.
DERIVED = ("geometry", "texture", "export", "renders")


def prepare_run(run_dir: str | Path, cfg: Config, overwrite: bool = False) -> Path:
    """Write ``config.yaml`` (refusing a different config unless ``overwrite``); ``overwrite`` starts over."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise IdtoError(f"--out {run_dir} is a file; give a folder for the run")
    path = run_dir / "config.yaml"
    # Unchanged config: leave the file alone, so it stays the run's first output.
    if overwrite or not path.exists() or path.read_text(encoding="utf-8") != dump_config(cfg):
        write_run_config(run_dir, cfg, overwrite=overwrite)
    if overwrite:
        for name in DERIVED:
            shutil.rmtree(run_dir / name, ignore_errors=True)
    return run_dir


def ensure_init(run_dir: str | Path, cfg: Config, console: Console | None = None,
                progress: bool = True, targets: Callable[[], list[Mesh]] | None = None, *,
                device: torch.device | str | None = None) -> ExpressionField:
    """The template-regressed field of this run (``geometry/init.pt``), fitting it first if absent.

    ``targets`` gives the meshes to regress to (one per expression, e.g. the subject-fitted heads); None = the
    configured template for every expression. It is only called when the fit has to run. ``device``: where the
    fit runs and the returned field lives (None = the CPU); ``init.pt`` loads on any device whatever it was
    saved from. The hash grid is tiny-cuda-nn's when ``runtime.fast_paths`` allows it on that device.
    """
    run_dir = Path(run_dir)
    geo = run_dir / "geometry"
    device = torch.device(device) if device is not None else torch.device("cpu")
    field = build_field(cfg.geometry, n_expressions=len(cfg.expressions), seed=cfg.seed,
                        fast_paths=cfg.runtime.fast_paths, device=device)
    if not (geo / "init_report.json").exists() or not (geo / "init.pt").exists():
        template = targets() if targets is not None else resolve_template(cfg)
        torch.manual_seed(cfg.seed)
        with progress_bar("SDF regression", cfg.template.iterations, console, enabled=progress) as update:
            report = fit_field_to_mesh(field, template, cfg.template, seed=cfg.seed,
                                       on_step=lambda step, loss: update(loss=loss),
                                       device=device, log_every=cfg.runtime.log_every)
        save_fitted(run_dir, cfg, field, report)
        return field
    state = torch.load(geo / "init.pt", map_location="cpu", weights_only=True)
    if list(state.get("expressions", [])) != list(cfg.expressions):
        raise IdtoError(f"{geo / 'init.pt'} was fitted for expressions {state.get('expressions')}, not "
                        f"{cfg.expressions}; pass --overwrite to start over")
    load_field_state(field, state["field"], geo / "init.pt")
    return field
