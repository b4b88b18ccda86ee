"""The geometry stage (paper sections 3.1, 3.3, B): SDS on camera-space normal maps of the expression field.

Each iteration draws one expression and ``geometry.batch_size`` orbit cameras, renders the expression's mesh
as normal maps (RGB + coverage, what the normal prior was fine-tuned on), and minimises the SDS loss plus a
Laplacian smoothness term. The run folder holds everything needed to resume: a checkpoint with the field,
Adam's moments and every random state (sampling, guidance, torch), so a run stopped at any point and started
again ends bit-for-bit where an uninterrupted run ends.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from idto3d.core.atomic import atomic_write_text
from idto3d.core.config import Config
from idto3d.core.errors import IdtoError
from idto3d.geometry.expression_field import ExpressionField
from idto3d.nn.state import field_parameter_groups, load_field_state
from idto3d.geometry.laplacian import laplacian_loss
from idto3d.geometry.mesh_io import save_mesh
from idto3d.core.progress import progress_bar
from idto3d.stages.run_folder import ensure_init, prepare_run
from idto3d.stages.stage_state import StageCounters, StageState
from idto3d.stages.step_log import StepLog, bad_steps_error, nonfinite_flag, step_unless
from idto3d.priors.guidance import GuidanceCond, ScoreDistillation
from idto3d.render.backend import get_rasterizer
from idto3d.core.device import rasterizer_name, resolve_device, to_device
from idto3d.render.camera import Camera, sample_orbit_cameras, view_word
from idto3d.render.mesh import Mesh
from idto3d.render.normals import render_normal_map
from idto3d.render.preview import normal_turntable, save_png

PROMPT = "A {view} view normal map face portrait of {subject} on a white background"


@dataclass
class GeometryStageResult:
    meshes: dict[str, Mesh]  # final (or, after ``stop_after``, current) mesh per expression name
    iterations: int          # iterations of the run done so far (all calls together)
    skipped_steps: int       # non-finite steps skipped so far (all calls together)
    seconds: float           # optimisation wall time so far (all calls together)
    resumed_from: int        # the iteration this call started at (0 = fresh run)


def geometry_prompts(cameras: Camera, subject: str) -> list[str]:
    """The view-dependent prompt per camera, as the normal prior was trained."""
    return [PROMPT.format(view=w, subject=subject) for w in view_word(cameras.azimuth_deg.cpu())]


def render_for_guidance(mesh: Mesh, cameras: Camera, resolution: int, rasterizer=None) -> torch.Tensor:
    """``[B, 4, H, W]`` in [0, 1]: camera-space normals (RGB) and antialiased coverage."""
    out = render_normal_map(mesh, cameras, resolution, rasterizer=rasterizer)
    return torch.cat([out.image, out.mask], dim=-1).permute(0, 3, 1, 2)


def conditioning_key(id_embedding: torch.Tensor | None, subject: str) -> str:
    h = hashlib.sha256(subject.encode("utf-8"))
    if id_embedding is not None:
        h.update(id_embedding.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def all_finite(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


def current_meshes(field: ExpressionField, names: list[str]) -> dict[str, Mesh]:
    """Each expression's mesh, on the host (what later steps and files take, wherever the field runs)."""
    with torch.no_grad():
        return {name: field(i).detach().cpu() for i, name in enumerate(names)}


def preview_resolution(render_resolution: int) -> int:
    """Previews are for people: at least 128 px a view, at most 256 (cost grows with the square)."""
    return min(max(render_resolution, 128), 256)


def save_progress(field: ExpressionField, names: list[str], path: Path, resolution: int) -> None:
    """One row per expression: normal maps from the front, side, back and other side."""
    rows = [normal_turntable(m, n_views=4, resolution=resolution) for m in current_meshes(field, names).values()]
    save_png(np.concatenate(rows, axis=0), path)


def _finished(geo: Path, cfg: Config, key: str, field: ExpressionField) -> GeometryStageResult:
    info = json.loads((geo / "done.json").read_text(encoding="utf-8"))
    if info.get("conditioning") != key:
        raise IdtoError(f"{geo} was made for a different identity or prompt; pass --overwrite to start over")
    state = torch.load(geo / "ckpt.pt", map_location="cpu", weights_only=True)
    load_field_state(field, state["field"], str(geo / "ckpt.pt"))
    return GeometryStageResult(current_meshes(field, cfg.expressions), info["iterations"], info["skipped_steps"],
                               info["seconds"], info["iterations"])


def run_geometry_stage(run_dir: str | Path, cfg: Config, guidance: ScoreDistillation, *,
                       id_embedding: torch.Tensor | None = None, subject: str = "a person",
                       overwrite: bool = False, progress: bool = True, console: Console | None = None,
                       stop_after: int | None = None) -> GeometryStageResult:
    """Run (or resume, or reuse when finished) the geometry SDS stage in ``run_dir``.

    ``guidance`` is built by the caller with ``total_steps = cfg.geometry.iterations``; its random state is
    checkpointed with the run. ``stop_after`` stops after that many iterations of this call (checkpointed).
    """
    run_dir = prepare_run(run_dir, cfg, overwrite)
    geo = run_dir / "geometry"
    gcfg, names = cfg.geometry, list(cfg.expressions)
    key = conditioning_key(id_embedding, subject)
    device = resolve_device(cfg.runtime.device)
    field = ensure_init(run_dir, cfg, console, progress, device=device)
    if (geo / "done.json").exists():
        return _finished(geo, cfg, key, field)

    rasterizer = get_rasterizer(rasterizer_name(cfg.render.backend, cfg.runtime.fast_paths), device)
    # fused: one kernel per step, and it can skip a non-finite step on the device (found_inf)
    opt = torch.optim.Adam(field_parameter_groups(field, gcfg.lr, gcfg.encoding_lr_scale), lr=gcfg.lr, fused=True)
    sampler = torch.Generator().manual_seed(cfg.seed)
    ckpt_path, log_path = geo / "ckpt.pt", geo / "log.jsonl"
    stage = StageState(field, opt, sampler, {"guidance": guidance}, key)
    counters = stage.begin(ckpt_path, log_path, f"{geo} holds a run for a different identity or prompt; pass "
                                                f"--overwrite to start over", cfg.seed)
    start = counters.iteration
    guidance.deferred_checks = True
    if id_embedding is not None:
        id_embedding = to_device(id_embedding.detach().float(), device)

    def too_many(at: int, c: StageCounters) -> IdtoError:
        return bad_steps_error("geometry", at, c, ckpt_path,
                               "Lower geometry.lr or prior.guidance.guidance_scale, or check the prior")

    def checkpoint(iteration: int) -> None:
        counters.iteration = iteration
        stage.save(ckpt_path, counters)

    total = gcfg.iterations
    end = total if stop_after is None else min(total, start + max(stop_after, 0))
    cam_cfg = cfg.render.camera
    title = "geometry SDS" if start == 0 else f"geometry SDS (resumed at {start}/{total})"
    it = start
    with progress_bar(title, end - start, console, enabled=progress) as update, \
            log_path.open("a", encoding="utf-8") as log_file:
        log = StepLog(log_file, cfg.runtime.log_every, counters, gcfg.max_bad_steps, too_many)
        for it in range(start, end):
            t0 = time.perf_counter()
            e = int(torch.randint(len(names), (1,), generator=sampler))
            # Drawn and worded on the host (the prompts need the azimuths), then sent to the device.
            cams = sample_orbit_cameras(gcfg.batch_size, cam_cfg.elevation_deg, cam_cfg.azimuth_deg,
                                        cam_cfg.radius, cam_cfg.fov_deg, generator=sampler)
            cond = GuidanceCond(prompts=geometry_prompts(cams, subject), id_embedding=id_embedding,
                                expressions=[names[e]] * len(cams), cameras=cams.to(device),
                                expression_indices=[e] * len(cams))
            opt.zero_grad(set_to_none=True)
            mesh = field(e)
            # Marching tets' output size depends on the SDF, so the host learns the face count here anyway.
            if mesh.faces.shape[0] == 0:
                # No triangles: renders are empty and SDS has no gradient to bring the surface back.
                raise IdtoError(f"the surface of '{names[e]}' vanished at iteration {it}; the last checkpoint "
                                f"is in {ckpt_path}. Raise template.iterations (a better initial fit), lower "
                                f"geometry.lr or prior.guidance.guidance_scale, or check the prior")
            images = render_for_guidance(mesh, cond.cameras, cfg.render.resolution, rasterizer)
            out = guidance(images, cond, it)
            lap = laplacian_loss(mesh)
            loss = out.loss + gcfg.laplacian_weight * lap
            loss.backward()
            bad = nonfinite_flag(field.parameters(), loss, finite=out.finite)
            step_unless(opt, bad)
            log.add({"it": it, "expression": names[e], "t": out.t,
                     "azimuth": [round(a, 2) for a in cams.azimuth_deg.tolist()]},
                    {"loss": loss, "sds": out.loss, "laplacian": lap}, bad, time.perf_counter() - t0)
            done_its = it + 1
            at_checkpoint, at_preview = log.after_step(done_its, end, total, gcfg.checkpoint_every,
                                                       gcfg.preview_every)
            update(**log.shown)
            if at_checkpoint:
                checkpoint(done_its)
            if at_preview:
                save_progress(field, names, geo / "progress.png", preview_resolution(cfg.render.resolution))
            it = done_its

    checkpoint(it)
    skipped, elapsed = counters.skipped_steps, counters.seconds
    if it < total:  # stopped early on request: resumable from here
        return GeometryStageResult(current_meshes(field, names), it, skipped, elapsed, start)
    meshes = current_meshes(field, names)
    save_progress(field, names, geo / "progress.png", preview_resolution(cfg.render.resolution))
    for name, mesh in meshes.items():
        save_mesh(mesh, geo / f"{name}.ply")
        save_mesh(mesh, geo / f"{name}.obj")
    # Written last: its presence marks the stage as finished.
    atomic_write_text(geo / "done.json", json.dumps({
        "iterations": total, "skipped_steps": skipped, "seconds": elapsed, "conditioning": key,
        "expressions": names, "vertices": {n: int(m.vertices.shape[0]) for n, m in meshes.items()},
        "faces": {n: int(m.faces.shape[0]) for n, m in meshes.items()}}, indent=2))
    return GeometryStageResult(meshes, total, skipped, elapsed, start)
