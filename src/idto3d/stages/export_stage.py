"""The run's render-ready output: per expression a GLB + OBJ/MTL with PBR maps, and a turntable.

Maps are baked from the texture field at ``export.texture_size`` (the field is continuous over the surface, so
the export may be sharper than the texture the stage optimised). Without a texture (no albedo prior yet) the
meshes are exported with a uniform grey material, and the report says so.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from idto3d.core.atomic import atomic_write_text
from idto3d.core.config import Config
from idto3d.core.progress import progress_bar
from idto3d.core.run_layout import RunLayout
from idto3d.core.run_manifest import check_stage_key
from idto3d.core.stored_files import read_json_file
from idto3d.export import PBRMaps, UVMesh, export_expression
from idto3d.export.morph import same_layout, write_morph_glb
from idto3d.export.placement import box_centre
from idto3d.export.turntable import find_ffmpeg, write_turntable
from idto3d.geometry.surface_fit import closest_distances, distance_stats_mm, fit_to_surface
from idto3d.texture.texels import texel_map
from idto3d.texture.texture_field import TextureField

GREY = (0.5, 0.7, 0.0)  # albedo, roughness, metallic of the placeholder material


def baked_maps(field: TextureField, index: int, atlas: UVMesh, size: int) -> PBRMaps:
    """The field's maps for expression ``index`` on ``atlas`` at ``size`` x ``size`` texels.

    Baked on the field's device (the texel points go there once); only the finished maps come back."""
    device = field.codes.device
    with torch.no_grad():
        maps = field.bake(index, texel_map(atlas, size).to(device), chunk=131_072)
    host = {k: v.cpu().numpy() for k, v in maps.items()}
    return PBRMaps.create(host["albedo"], host["roughness"][..., 0], host["metallic"][..., 0])


def grey_maps(size: int = 16) -> PBRMaps:
    a, r, m = GREY
    return PBRMaps.create(np.full((size, size, 3), a, np.float32), np.full((size, size), r, np.float32),
                          np.full((size, size), m, np.float32))


def export_run(run_dir: str | Path, cfg: Config, atlases: dict[str, UVMesh],
               maps_for: Callable[[int, str, UVMesh], PBRMaps], *, console: Console | None = None,
               progress: bool = True, key: dict[str, str] | None = None) -> list[Path]:
    """Write ``export/`` and ``renders/`` for every expression; ``maps_for(index, name, atlas)`` gives its maps.

    ``export/done.json`` lists what was written, last, so a run killed mid-export exports again on resume.
    """
    layout = RunLayout(run_dir)
    ecfg = cfg.export
    written: list[Path] = []
    video = ecfg.video and find_ffmpeg() is not None
    base_maps = None
    with progress_bar("export + turntables", len(atlases), console, enabled=progress) as update:
        for i, (name, atlas) in enumerate(atlases.items()):
            maps = maps_for(i, name, atlas)
            base_maps = maps if i == 0 else base_maps
            written += list(export_expression(layout.export, name, atlas, maps).values())
            written += list(write_turntable(layout.renders, name, atlas, maps, ecfg.turntable_views,
                                            ecfg.turntable_resolution, video).values())
            update()
    if ecfg.morph_targets and len(atlases) > 1 and base_maps is not None:
        written += write_morph_targets(layout, atlases, base_maps)
    notes = []
    if ecfg.video and not video:
        notes.append("no MP4 turntables: ffmpeg not found (install ffmpeg, or pip install imageio-ffmpeg)")
    atomic_write_text(layout.export_done, json.dumps({
        "files": [str(p.relative_to(layout.root)) for p in written], "notes": notes,
        **({"key": key} if key else {})}, indent=2))
    return written


def morph_poses(atlases: dict[str, UVMesh]) -> tuple[dict[str, UVMesh], dict[str, np.ndarray],
                                                      dict[str, dict[str, float]] | None]:
    """Every expression after the first as a pose of the first one's mesh, the offset of its bounding-box centre
    from the expression's own (model units), and the fitting error per expression.

    Expressions that already share the first one's layout (the offline heads) are taken as they are (error
    ``None``); others (each DMTet expression has its own topology) get the first mesh fitted onto their surface.
    """
    names = list(atlases)
    base = atlases[names[0]]
    if all(same_layout(base, atlases[n]) for n in names[1:]):
        return {n: atlases[n] for n in names[1:]}, {}, None
    welded, _, _ = base.render_inputs()
    src_v, src_f = welded.vertices.numpy(), base.vmapping[base.faces]
    poses, offsets, errors = {}, {}, {}
    for n in names[1:]:
        fit = fit_to_surface(src_v, src_f, atlases[n].vertices, atlases[n].faces)
        # One-sided distances miss parts of the expression the fit never reached: record the reverse too.
        back, _ = closest_distances(atlases[n].vertices, fit.vertices, src_f)
        reverse = {f"expression_to_fit_{k}": v for k, v in distance_stats_mm(back).items()}
        poses[n], errors[n] = base.with_positions(fit.vertices), fit.error_mm() | reverse
        # Each .glb is centred on its own bounding box: the target must sit where the expression's .glb puts its
        # surface, not on the fitted mesh's (slightly different) box.
        offsets[n] = box_centre(poses[n].vertices) - box_centre(atlases[n].vertices)
    return poses, offsets, errors


def write_morph_targets(layout: RunLayout, atlases: dict[str, UVMesh], base_maps: PBRMaps) -> list[Path]:
    """``export/morph/head.glb`` (the first expression's texture), plus ``morph_fit.json`` when fitted."""
    poses, offsets, errors = morph_poses(atlases)
    first = next(iter(atlases))
    written = [write_morph_glb(layout.morph_glb, atlases[first], poses, base_maps, offsets=offsets)]
    if errors is not None:
        written.append(atomic_write_text(layout.morph_fit, json.dumps({
            "about": f"distance of the morph targets' vertices ({first} mesh fitted onto each expression's "
                     "surface) to that expression's exported mesh, millimetres; expression_to_fit_*: the other "
                     "way round (the expression's vertices to the fitted mesh)",
            "base": first, "expressions": errors}, indent=2)))
    return written


def exported_files(run_dir: str | Path, key: dict[str, str] | None = None) -> list[Path] | None:
    """The files of a finished export, or None when the export has not finished. ``key``: what this call would
    export from; a finished export made from something else is refused."""
    layout = RunLayout(run_dir)
    if not layout.export_done.exists():
        return None
    info = read_json_file(layout.export_done)
    if key is not None:
        check_stage_key(layout.export_done, info, key, layout.root)
    files = [layout.root / f for f in info["files"]]
    return files if all(f.exists() for f in files) else None
