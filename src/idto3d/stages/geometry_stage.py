"""The geometry stage (paper sections 3.1, 3.3, B): SDS on camera-space normal maps of the expression field.

Each iteration draws one expression and ``geometry.batch_size`` orbit cameras, renders the expression's mesh
as normal maps (RGB + coverage, what the normal prior was fine-tuned on), and minimises the SDS loss plus a
Laplacian smoothness term. The run folder holds everything needed to resume: a checkpoint with the field,
Adam's moments and every random state (sampling, guidance, torch), so a run stopped at any point and started
again ends bit-for-bit where an uninterrupted run ends.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from idto3d.core.config import Config, GeometryConfig
from idto3d.core.device import resolve_device
from idto3d.core.errors import IdtoError, MeshError
from idto3d.core.run_layout import RunLayout, SDSFiles
from idto3d.geometry.expression_field import ExpressionField
from idto3d.geometry.laplacian import laplacian_loss
from idto3d.geometry.mesh_io import load_mesh, save_mesh
from idto3d.nn.state import field_parameter_groups
from idto3d.priors.conventions import LEGACY_PROMPTS, NORMAL_ENCODINGS, Conventions, legacy
from idto3d.priors.guidance import GuidanceCond, ScoreDistillation, TimestepSchedule
from idto3d.render.backend import Rasterizer
from idto3d.render.camera import Camera, view_word
from idto3d.render.mesh import Mesh
from idto3d.render.normals import render_normal_map
from idto3d.render.preview import normal_turntable, save_png
from idto3d.stages.sds_runner import (SDSProgress, SDSStage, SDSStep, conditioning_key, draw_views, embedding_on,
                                      finished, preview_resolution, run_sds, stage_rasterizer, write_done)

PROMPT = LEGACY_PROMPTS["normal"]  # priors without conventions (and oracles) keep this prompt
CONDITIONED_ON = "identity or prompt"


@dataclass
class GeometryStageResult(SDSProgress):
    meshes: dict[str, Mesh]  # final (or, after ``stop_after``, current) mesh per expression name


def geometry_schedule(gcfg: GeometryConfig) -> TimestepSchedule:
    """The geometry SDS timestep schedule the config asks for (default: the paper's, ``SCHEDULES["geometry"]``)."""
    return TimestepSchedule("geometry", tuple(gcfg.t_range), tuple(gcfg.t_range_end), anneal_from=gcfg.t_anneal_from)


def stage_conventions(guidance: ScoreDistillation) -> Conventions:
    """The normal prior's conventions (prompts, background, encoding); legacy ones for oracles and older priors."""
    return getattr(guidance, "conventions", None) or legacy("normal")


def geometry_prompts(cameras: Camera, subject: str, conventions: Conventions | None = None) -> list[str]:
    """The view-dependent prompt per camera, as the normal prior was trained."""
    conv = conventions or legacy("normal")
    return [conv.prompt(w, subject) for w in view_word(cameras.azimuth_deg.cpu())]


def render_for_guidance(mesh: Mesh, cameras: Camera, resolution: int, rasterizer=None,
                        conventions: Conventions | None = None) -> torch.Tensor:
    """``[B, 4, H, W]`` in [0, 1]: camera-space normals (RGB, over the prior's background, in its encoding)
    and antialiased coverage."""
    conv = conventions or legacy("normal")
    out = render_normal_map(mesh, cameras, resolution, background=conv.background, rasterizer=rasterizer,
                            axis_signs=NORMAL_ENCODINGS[conv.normal_encoding])
    return torch.cat([out.image, out.mask], dim=-1).permute(0, 3, 1, 2)


def current_meshes(field: ExpressionField, names: list[str]) -> dict[str, Mesh]:
    """Each expression's mesh, on the host (what later steps and files take, wherever the field runs)."""
    with torch.no_grad():
        return {name: field(i).detach().cpu() for i, name in enumerate(names)}


def save_progress(field: ExpressionField, names: list[str], path: Path, resolution: int) -> None:
    """One row per expression: normal maps from the front, side, back and other side."""
    rows = [normal_turntable(m, n_views=4, resolution=resolution) for m in current_meshes(field, names).values()]
    save_png(np.concatenate(rows, axis=0), path)


@dataclass
class _GeometryStep:
    """One iteration: an expression, ``geometry.batch_size`` orbit cameras, their normal maps scored by the
    guidance, plus the Laplacian smoothness term."""

    cfg: Config
    field: ExpressionField
    guidance: ScoreDistillation
    sampler: torch.Generator
    id_embedding: torch.Tensor | None  # on the device
    subject: str
    device: torch.device
    rasterizer: Rasterizer
    checkpoint: Path

    def __call__(self, it: int) -> SDSStep:
        gcfg, names = self.cfg.geometry, self.cfg.expressions
        e, cams = draw_views(self.sampler, len(names), gcfg.batch_size, self.cfg.render.camera)
        conv = stage_conventions(self.guidance)
        cond = GuidanceCond(prompts=geometry_prompts(cams, self.subject, conv), id_embedding=self.id_embedding,
                            negative_prompt=conv.negative_prompt,
                            expressions=[names[e]] * len(cams), cameras=cams.to(self.device),
                            expression_indices=[e] * len(cams))
        mesh = self.field(e)
        # Marching tets' output size depends on the SDF, so the host learns the face count here anyway.
        if mesh.faces.shape[0] == 0:
            # No triangles: renders are empty and SDS has no gradient to bring the surface back.
            raise IdtoError(f"the surface of '{names[e]}' vanished at iteration {it}; the last checkpoint "
                            f"is in {self.checkpoint}. Raise template.iterations (a better initial fit), lower "
                            f"geometry.lr or prior.guidance.guidance_scale, or check the prior")
        images = render_for_guidance(mesh, cond.cameras, self.cfg.render.resolution, self.rasterizer, conv)
        out = self.guidance(images, cond, it)
        lap = laplacian_loss(mesh)
        loss = out.loss + gcfg.laplacian_weight * lap
        record = {"it": it, "expression": names[e], "t": out.t,
                  "azimuth": [round(a, 2) for a in cams.azimuth_deg.tolist()]}
        return SDSStep(record, {"loss": loss, "sds": out.loss, "laplacian": lap}, out.finite)


def _stage(files: SDSFiles, cfg: Config, guidance: ScoreDistillation, field: ExpressionField, key: str) -> SDSStage:
    gcfg = cfg.geometry
    # fused: one kernel per step, and it can skip a non-finite step on the device (found_inf)
    groups = field_parameter_groups(field, gcfg.lr, gcfg.encoding_lr_scale, gcfg.code_lr_scale, gcfg.code_path)
    opt = torch.optim.Adam(groups, lr=gcfg.lr, fused=True)
    return SDSStage("geometry", files, CONDITIONED_ON, key, field, opt, {"guidance": guidance}, cfg.seed,
                    gcfg.iterations, gcfg.checkpoint_every, gcfg.preview_every, gcfg.max_bad_steps,
                    "Lower geometry.lr or prior.guidance.guidance_scale, or check the prior", cfg.runtime.log_every,
                    "geometry SDS")


def _save_meshes(layout: RunLayout, meshes: dict[str, Mesh]) -> None:
    for name, mesh in meshes.items():
        save_mesh(mesh, layout.stage_mesh(name, ".ply"))
        save_mesh(mesh, layout.stage_mesh(name, ".obj"))


def _handed_over(layout: RunLayout, field: ExpressionField, names: list[str]) -> dict[str, Mesh]:
    """The finished stage's meshes as it saved them. Extracting them from the field again gives other last bits
    on a CPU with other vector units, and the texture stage's checkpoint is tied to the meshes' bits: a run folder
    finished on one machine must resume on another. Re-extracted only when a file is missing or unreadable."""
    try:
        return {name: load_mesh(layout.stage_mesh(name, ".ply"), merge=False) for name in names}
    except MeshError:
        return current_meshes(field, names)


def run_geometry_stage(run_dir: str | Path, cfg: Config, guidance: ScoreDistillation, field: ExpressionField, *,
                       id_embedding: torch.Tensor | None = None, subject: str = "a person",
                       progress: bool = True, console: Console | None = None,
                       stop_after: int | None = None) -> GeometryStageResult:
    """Run (or resume, or reuse when finished) the geometry SDS stage in ``run_dir``, optimising ``field``.

    The caller has prepared the run folder (``stages.run_folder.prepare_run``) and passes the run's initial
    field (``stages.initial_geometry.ensure_init``, on the run's device). ``guidance`` is built by the caller
    with ``total_steps = cfg.geometry.iterations``; its random state is checkpointed with the run.
    ``stop_after`` stops after that many iterations of this call (checkpointed).
    """
    layout = RunLayout(run_dir)
    names = list(cfg.expressions)
    key = conditioning_key(id_embedding, subject)
    done = finished(layout.geometry_sds, key, field, CONDITIONED_ON)
    if done is not None:
        return GeometryStageResult(**asdict(done), meshes=_handed_over(layout, field, names))

    device = resolve_device(cfg.runtime.device)
    spec = _stage(layout.geometry_sds, cfg, guidance, field, key)
    step = _GeometryStep(cfg, field, guidance, spec.sampler, embedding_on(id_embedding, device), subject, device,
                         stage_rasterizer(cfg, device), spec.files.checkpoint)
    res = preview_resolution(cfg.render.resolution)
    run = run_sds(spec, step, lambda: save_progress(field, names, spec.files.progress, res),
                  stop_after=stop_after, console=console, progress=progress)
    meshes = current_meshes(field, names)
    if run.iterations == cfg.geometry.iterations:
        _save_meshes(layout, meshes)
        write_done(spec.files, run, key, names, vertices={n: int(m.vertices.shape[0]) for n, m in meshes.items()},
                   faces={n: int(m.faces.shape[0]) for n, m in meshes.items()})
    return GeometryStageResult(**asdict(run), meshes=meshes)
