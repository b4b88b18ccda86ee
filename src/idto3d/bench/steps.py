"""One SDS iteration of each stage, timed part by part: shared by ``bench geometry``, ``bench texture`` and
``bench pipeline``.

Parts: the field (SDF + marching tets; or baking the UV textures), the render (normals + mask; or the shaded
pseudo-albedo), the guidance call, backward and the Adam step. Each lap synchronises the device first, so on a
GPU a lap holds its own kernels. The first iteration is a warm-up (allocators, lazy initialisation, the prefilter
cache) unless ``warmup`` is off, for steps so slow that one timed iteration is all a run can afford.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from idto3d.core.config import Config
from idto3d.stages.step_log import nonfinite_flag, step_unless
from idto3d.core.device import rasterizer_name, reproducible_kernels

PARTS = ("field", "render", "guidance", "backward", "step")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Stopwatch:
    """Milliseconds between ``lap`` calls."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.laps = device, []
        sync(device)
        self.t = time.perf_counter()

    def lap(self) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.laps.append((now - self.t) * 1000.0)
        self.t = now


def _schedule(repeats: int, warmup: bool) -> list[bool]:
    return ([False] if warmup else []) + [True] * repeats


def _prewarm(guidance: Any, prompts: list[str], cache_dir: Path | None) -> None:
    # A run memoises prompt and expression embeddings after its first steps: do that outside the timed laps.
    if cache_dir is not None and hasattr(guidance, "prior"):
        guidance.prior.encode_text(list(prompts) + [""])
        guidance.prior.expression_table(cache_dir)


def time_geometry_step(cfg: Config, field: torch.nn.Module, guidance: Any, id_embedding: torch.Tensor | None,
                       repeats: int, device: torch.device | None = None, *, warmup: bool = True,
                       prewarm_cache: Path | None = None, reproducible: bool = True) -> dict[str, float]:
    """Median ms per part of a geometry iteration of ``field`` (on ``device``); with ``reproducible`` off, under
    torch's default kernels instead of the stage's deterministic ones (to measure what determinism costs)."""
    from idto3d.nn.state import field_parameter_groups
    from idto3d.geometry.laplacian import laplacian_loss
    from idto3d.stages.geometry_stage import geometry_prompts, render_for_guidance, stage_conventions
    from idto3d.priors.guidance import GuidanceCond
    from idto3d.render.backend import get_rasterizer
    from idto3d.render.camera import sample_orbit_cameras

    device = device or torch.device("cpu")
    opt = torch.optim.Adam(field_parameter_groups(field, cfg.geometry.lr, cfg.geometry.encoding_lr_scale,
                                                  cfg.geometry.code_lr_scale, cfg.geometry.code_path),
                           fused=True)
    rast = get_rasterizer(rasterizer_name(cfg.render.backend, cfg.runtime.fast_paths), device)
    guidance.deferred_checks = True  # as the stage runs it: no per-step wait for the device
    gen = torch.Generator().manual_seed(0)
    cam = cfg.render.camera
    times: dict[str, list[float]] = {p: [] for p in PARTS}
    with reproducible_kernels(device) if reproducible else nullcontext():  # as the stages run
        for i, timed in enumerate(_schedule(repeats, warmup)):
            host_cams = sample_orbit_cameras(cfg.geometry.batch_size, cam.elevation_deg, cam.azimuth_deg, cam.radius,
                                             cam.fov_deg, generator=gen)
            conv = stage_conventions(guidance)  # the prior's prompts, negative prompt and normal-map background
            prompts = geometry_prompts(host_cams, "a person", conv)
            cams = host_cams.to(device)
            _prewarm(guidance, prompts + [conv.negative_prompt], prewarm_cache)
            cond = GuidanceCond(prompts=prompts, id_embedding=id_embedding,
                                expressions=[cfg.expressions[0]] * len(cams), cameras=cams, expression_indices=[0],
                                negative_prompt=conv.negative_prompt)
            opt.zero_grad(set_to_none=True)
            watch = Stopwatch(device)
            mesh = field(0)
            watch.lap()
            images = render_for_guidance(mesh, cams, cfg.render.resolution, rast, conv)
            watch.lap()
            out = guidance(images, cond, i)
            loss = out.loss + cfg.geometry.laplacian_weight * laplacian_loss(mesh)
            watch.lap()
            loss.backward()
            watch.lap()
            step_unless(opt, nonfinite_flag(field.parameters(), loss, finite=out.finite))
            watch.lap()
            if timed:
                for p, ms in zip(PARTS, watch.laps):
                    times[p].append(ms)
    return {p: statistics.median(v) for p, v in times.items()}


def time_texture_step(cfg: Config, expr: Any, guidance: Any, shading: str, id_embedding: torch.Tensor | None,
                      repeats: int, device: torch.device | None = None, *, warmup: bool = True,
                      prewarm_cache: Path | None = None) -> dict[str, float]:
    """Median ms per part of a texture iteration in the ``diffuse`` or ``pbr`` sub-stage; ``expr`` is a
    ``TexturedExpression`` on ``device``."""
    from idto3d.priors.conventions import legacy
    from idto3d.stages.texture_stage import texture_prompts
    from idto3d.priors.guidance import GuidanceCond, get_schedule
    from idto3d.render.backend import get_rasterizer
    from idto3d.render.camera import sample_orbit_cameras
    from idto3d.render.pseudo_albedo import render_pseudo_albedo
    from idto3d.texture.texture_field import build_texture_field, texture_optimizer
    from idto3d.texture.lighting import LightingSampler

    device = device or torch.device("cpu")
    tcfg = cfg.texture
    field = build_texture_field(tcfg, 1, seed=0, fast_paths=cfg.runtime.fast_paths, device=device)
    opt = texture_optimizer(field, tcfg.lr)
    rast = get_rasterizer(rasterizer_name(cfg.render.backend, cfg.runtime.fast_paths), device)
    lighting = LightingSampler(tcfg, 0, progress=False, device=device)
    guidance.deferred_checks = True
    gen = torch.Generator().manual_seed(0)
    cam = cfg.render.camera
    guidance.schedule = get_schedule("texture_diffuse" if shading == "diffuse" else "texture_pbr")
    times: dict[str, list[float]] = {p: [] for p in PARTS}
    with reproducible_kernels(device):  # as the stages run
        for i, timed in enumerate(_schedule(repeats, warmup)):
            host_cams = sample_orbit_cameras(tcfg.batch_size, cam.elevation_deg, cam.azimuth_deg, cam.radius,
                                             cam.fov_deg, generator=gen)
            env = lighting.sample(gen)
            conv = getattr(guidance, "conventions", None) or legacy("albedo")
            prompts = texture_prompts(host_cams, "a person", conv)
            cams = host_cams.to(device)
            _prewarm(guidance, prompts + [conv.negative_prompt], prewarm_cache)
            cond = GuidanceCond(prompts=prompts, id_embedding=id_embedding,
                                expressions=[cfg.expressions[0]] * len(cams), cameras=cams, expression_indices=[0],
                                lighting=env, shading=shading,
                                negative_prompt=conv.negative_prompt)
            opt.zero_grad(set_to_none=True)
            watch = Stopwatch(device)
            maps = field.bake(0, expr.texels)
            watch.lap()
            images = render_pseudo_albedo(expr.mesh, cams, cfg.render.resolution, maps["albedo"], maps["roughness"],
                                          maps["metallic"], env, uv=expr.uv, attribute_faces=expr.attribute_faces,
                                          diffuse_only=shading == "diffuse", rasterizer=rast).for_guidance()
            watch.lap()
            out = guidance(images, cond, i)
            watch.lap()
            out.loss.backward()
            watch.lap()
            step_unless(opt, nonfinite_flag(field.parameters(), out.loss, finite=out.finite))
            watch.lap()
            if timed:
                for p, ms in zip(PARTS, watch.laps):
                    times[p].append(ms)
    return {p: statistics.median(v) for p, v in times.items()}
