"""The offline texture as a run step: the texture field fitted to the subject's photos (``texture/photo.pt``).

The neutral expression's surface is textured from the photos through their fitted cameras
(``texture.photo_texture``); every other expression's code then starts as the neutral's, so each expression shows
the same skin at the same surface points (the field is queried at 3-D points, and the expressions' surfaces differ
only around the moving parts). With an albedo prior, the texture SDS stage starts from this field.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console

from idto3d.core.atomic import atomic_torch_save, atomic_write_text
from idto3d.core.config import Config
from idto3d.core.progress import progress_bar
from idto3d.core.run_layout import RunLayout
from idto3d.core.run_manifest import check_stage_key
from idto3d.core.stored_files import load_torch_file, read_json_file
from idto3d.stages.stage_keys import photo_texture_key
from idto3d.stages.subject_init import SubjectFit
from idto3d.stages.texture_stage import TexturedExpression, prepare_expressions
from idto3d.render.mesh import Mesh
from idto3d.nn.state import cpu_state_dict, load_field_state
from idto3d.texture.texture_field import TextureField, build_texture_field
from idto3d.texture.photo_texture import PhotoView, fit_photo_texture


@dataclass
class PhotoTextureResult:
    field: TextureField
    expressions: dict[str, TexturedExpression]
    report: dict


def run_photo_texture(run_dir: Path, cfg: Config, meshes: dict[str, Mesh], subject: SubjectFit, *,
                      console: Console | None = None, progress: bool = True,
                      device: torch.device | str | None = None) -> PhotoTextureResult:
    """Fit (or reload, when finished) the photo texture of ``meshes`` (one per run expression, neutral first).

    ``device``: where the fit runs and the returned field lives (None = the CPU). ``photo.pt`` is saved with
    CPU tensors, so it loads on any machine.
    """
    layout = RunLayout(run_dir)
    state, report_path = layout.photo_texture, layout.photo_report
    names = list(meshes)
    device = torch.device(device) if device is not None else torch.device("cpu")
    expressions = prepare_expressions(layout.atlas, meshes, cfg.texture.resolution)
    field = build_texture_field(cfg.texture, len(names), seed=cfg.seed, fast_paths=cfg.runtime.fast_paths,
                                device=device)
    key = photo_texture_key(cfg, subject.photos, meshes)
    if report_path.exists() and state.exists():
        info = read_json_file(report_path)
        check_stage_key(report_path, info, key, layout.root)
        load_field_state(field, load_torch_file(state), state)
        return PhotoTextureResult(field, expressions, info)
    views = [PhotoView(img, subject.camera(i), subject.fit.photos[i].landmarks)
             for i, img in enumerate(subject.images)]
    with progress_bar("photo texture", cfg.photo_texture.iterations, console, enabled=progress) as update:
        # Lighting divided out and the scalp given the hair's colour (issue 17).
        report = fit_photo_texture(field, 0, expressions[names[0]], views, cfg.photo_texture, seed=cfg.seed,
                                   delight=True, hair=True,
                                   progress=lambda step, loss: update(loss=loss), device=device,
                                   log_every=cfg.runtime.log_every)
    with torch.no_grad():
        field.codes[1:] = field.codes[0]
    atomic_torch_save(state, cpu_state_dict(field))
    info = {**asdict(report), "photos": [str(p) for p in subject.photos], "key": key}
    atomic_write_text(report_path, json.dumps(info, indent=2))  # written last: marks the step finished
    return PhotoTextureResult(field, expressions, info)
