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
from idto3d.core.run_manifest import check_stage_key
from idto3d.core.stored_files import load_torch_file, read_json_file
from idto3d.stages.run_folder import open_run
from idto3d.stages.stage_keys import template_fit_key

Targets = Callable[[], Mesh | Sequence[Mesh]]


def resolve_template(cfg: Config) -> Mesh:
    """The configured template (``template.path``), or the built-in parametric head."""
    if cfg.template.path in (None, "", "builtin"):
        return build_head_template(cfg.template.build_resolution)
    return load_template(cfg.template.path)


def ensure_init(run_dir: str | Path, cfg: Config, console: Console | None = None,
                progress: bool = True, targets: Targets | None = None, *,
                device: torch.device | str | None = None, photos: Sequence[Path] | None = None) -> ExpressionField:
    """The run's initial field (``geometry/init.pt``), fitted first if the run has none yet.

    ``targets`` gives the meshes to regress to (one, or one per expression, e.g. the subject-fitted heads); None =
    the configured template for every expression. It is only called when the fit has to run. ``device``: where the
    fit runs and the returned field lives (None = the CPU); ``init.pt`` loads on any device whatever it was
    saved from. The hash grid is tiny-cuda-nn's when ``runtime.fast_paths`` allows it on that device.
    ``photos``: the photos ``targets`` were fitted to (None: the template); a finished fit is reused only when it
    was made from the same photos and settings (its key, ``stages.stage_keys.template_fit_key``).
    """
    layout = RunLayout(run_dir)
    device = torch.device(device) if device is not None else torch.device("cpu")
    field = build_field(cfg.geometry, n_expressions=len(cfg.expressions), seed=cfg.seed,
                        fast_paths=cfg.runtime.fast_paths, device=device)
    key = template_fit_key(cfg, photos)
    if layout.init_report.exists() and layout.init_field.exists():
        check_stage_key(layout.init_report, read_json_file(layout.init_report), key, layout.root)
        state = load_torch_file(layout.init_field)
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
    save_fitted(layout.root, cfg, field, report, key)
    return field


def save_fitted(run_dir: Path, cfg: Config, field: ExpressionField, report: FitReport,
                key: dict[str, str] | None = None) -> None:
    """``init.pt`` (CPU tensors, so it loads anywhere), one mesh per expression, the preview, the report last
    (with ``key``, what the fit was made from). A fit with no surface for an expression is never marked done."""
    layout = RunLayout(run_dir)
    with torch.no_grad():
        meshes = [field(i).detach() for i in range(len(cfg.expressions))]
    empty = [name for name, m in zip(cfg.expressions, meshes) if m.faces.shape[0] == 0]
    if empty:
        raise IdtoError(f"the template fit found no surface for {', '.join(empty)} after {cfg.template.iterations} "
                        f"iterations; raise template.iterations (the preview preset uses 400) and run again")
    atomic_torch_save(layout.init_field, {"field": cpu_state_dict(field), "expressions": cfg.expressions})
    strips = []
    with torch.no_grad():
        for name, mesh in zip(cfg.expressions, meshes):
            save_mesh(mesh, layout.init_mesh(name))
            strips.append(normal_turntable(mesh, n_views=4, resolution=192))
    # One row per expression (front, side, back, side): what the SDS stage starts from.
    save_png(np.concatenate(strips, axis=0), layout.init_preview)
    # Written last: its presence marks the step as finished.
    atomic_write_text(layout.init_report, json.dumps({**report.__dict__, **({"key": key} if key else {})},
                                                     indent=2))


def load_fit_report(run_dir: str | Path) -> FitReport:
    """The finished fit's ``init_report.json``."""
    info = read_json_file(RunLayout(run_dir).init_report)
    return FitReport(**{k: v for k, v in info.items() if k != "key"})


def fit_template(run_dir: str | Path, cfg: Config, *, overwrite: bool = False, console: Console | None = None,
                 progress: bool = True) -> FitReport:
    """``idto3d fit-template``: a run folder holding only the initial field, fitted to the template.

    Re-running on a finished folder with the same config returns the stored report without fitting again; a
    different config is refused unless ``overwrite`` (which starts the folder over). Fits on the CPU.
    """
    # The template is checked before anything is written, so fixing a bad path and re-running is not mistaken
    # for a different run.
    template = resolve_template(cfg)
    with open_run(run_dir, console) as run:
        run.begin(cfg, None, overwrite)
        ensure_init(run.layout.root, cfg, console, progress, targets=lambda: template)
        return load_fit_report(run.layout.root)
