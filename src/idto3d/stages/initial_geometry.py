"""The run's initial geometry: the expression field regressed to the target heads, fitted once per run.

The paper (section B, following Fantasia3D) starts SDS from a head obtained "by regression fitting". The targets
are the configured template for every expression, or (with photos) the subject's fitted face merged into it
(``stages.subject_init``). The fit (``geometry.template_fit``) is saved as ``geometry/init.pt`` with a mesh and a
preview per expression and ``geometry/init_report.json`` last; a later call (``idto3d generate`` resuming, or
``idto3d fit-template`` run again) reloads it instead of fitting again. Both commands take this one path.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from idto3d.core.atomic import atomic_torch_save, atomic_write_text
from idto3d.core.config import Config
from idto3d.core.errors import IdtoError
from idto3d.core.progress import progress_bar
from idto3d.core.run_layout import RunLayout
from idto3d.geometry.expression_field import ExpressionField, build_field
from idto3d.geometry.mesh_io import save_mesh
from idto3d.geometry.template import build_head_template, load_template
from idto3d.geometry.template_fit import FitReport, fit_field_to_mesh
from idto3d.nn.state import cpu_state_dict, load_field_state
from idto3d.render.mesh import Mesh
from idto3d.render.preview import normal_turntable, save_png
from idto3d.stages.run_folder import prepare_run

Targets = Callable[[], Mesh | Sequence[Mesh]]


def resolve_template(cfg: Config) -> Mesh:
    """The configured template (``template.path``), or the built-in parametric head."""
    if cfg.template.path in (None, "", "builtin"):
        return build_head_template(cfg.template.build_resolution)
    return load_template(cfg.template.path)


def ensure_init(run_dir: str | Path, cfg: Config, console: Console | None = None,
                progress: bool = True, targets: Targets | None = None, *,
                device: torch.device | str | None = None) -> ExpressionField:
    """The run's initial field (``geometry/init.pt``), fitted first if the run has none yet.

    ``targets`` gives the meshes to regress to (one, or one per expression, e.g. the subject-fitted heads); None =
    the configured template for every expression. It is only called when the fit has to run. ``device``: where the
    fit runs and the returned field lives (None = the CPU); ``init.pt`` loads on any device whatever it was
    saved from. The hash grid is tiny-cuda-nn's when ``runtime.fast_paths`` allows it on that device.
    """
    layout = RunLayout(run_dir)
    device = torch.device(device) if device is not None else torch.device("cpu")
    field = build_field(cfg.geometry, n_expressions=len(cfg.expressions), seed=cfg.seed,
                        fast_paths=cfg.runtime.fast_paths, device=device)
    if layout.init_report.exists() and layout.init_field.exists():
        state = torch.load(layout.init_field, map_location="cpu", weights_only=True)
        if list(state.get("expressions", [])) != list(cfg.expressions):
            raise IdtoError(f"{layout.init_field} was fitted for expressions {state.get('expressions')}, not "
                            f"{cfg.expressions}; pass --overwrite to start over")
        load_field_state(field, state["field"], layout.init_field)
        return field
    meshes = targets() if targets is not None else resolve_template(cfg)
    torch.manual_seed(cfg.seed)
    with progress_bar("SDF regression", cfg.template.iterations, console, enabled=progress) as update:
        report = fit_field_to_mesh(field, meshes, cfg.template, seed=cfg.seed,
                                   on_step=lambda step, loss: update(loss=loss),
                                   device=device, log_every=cfg.runtime.log_every)
    save_fitted(layout.root, cfg, field, report)
    return field


def save_fitted(run_dir: Path, cfg: Config, field: ExpressionField, report: FitReport) -> None:
    """``init.pt`` (CPU tensors, so it loads anywhere), one mesh per expression, the preview, the report last."""
    layout = RunLayout(run_dir)
    atomic_torch_save(layout.init_field, {"field": cpu_state_dict(field), "expressions": cfg.expressions})
    strips = []
    with torch.no_grad():
        for i, name in enumerate(cfg.expressions):
            mesh = field(i).detach()
            save_mesh(mesh, layout.init_mesh(name))
            strips.append(normal_turntable(mesh, n_views=4, resolution=192))
    # One row per expression (front, side, back, side): what the SDS stage starts from.
    save_png(np.concatenate(strips, axis=0), layout.init_preview)
    # Written last: its presence marks the step as finished.
    atomic_write_text(layout.init_report, json.dumps(report.__dict__, indent=2))


def load_fit_report(run_dir: str | Path) -> FitReport:
    """The finished fit's ``init_report.json``."""
    return FitReport(**json.loads(RunLayout(run_dir).init_report.read_text(encoding="utf-8")))


def fit_template(run_dir: str | Path, cfg: Config, *, overwrite: bool = False, console: Console | None = None,
                 progress: bool = True) -> FitReport:
    """``idto3d fit-template``: a run folder holding only the initial field, fitted to the template.

    Re-running on a finished folder with the same config returns the stored report without fitting again; a
    different config is refused unless ``overwrite`` (which starts the folder over). Fits on the CPU.
    """
    # The template is checked before anything is written, so fixing a bad path and re-running is not mistaken
    # for a different run.
    template = resolve_template(cfg)
    run_dir = prepare_run(run_dir, cfg, overwrite)
    ensure_init(run_dir, cfg, console, progress, targets=lambda: template)
    return load_fit_report(run_dir)
