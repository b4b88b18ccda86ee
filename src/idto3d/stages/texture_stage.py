"""The texture stage (paper sections 3.4, B): SDS on pseudo-albedo renders of a UV texture under random lighting.

The geometry stage's expression meshes are UV-unwrapped once (xatlas; one shared layout when the expressions
share topology) and the atlas is saved with the run, so a resumed run optimises the same texels. Each
iteration draws one expression, ``texture.batch_size`` orbit cameras and one environment map (randomly
rotated about +Y), bakes the expression's albedo/roughness/metallic textures from the texture field, renders
the pseudo-albedo image of eq. 7 and minimises the SDS loss of the albedo prior. Sub-stages, by iteration:

* ``diffuse``: the first ``diffuse_fraction`` (paper: 80 %), Lambertian shading only, t in [50, 900];
* ``pbr``: albedo + roughness + metallic under the full GGX material, t in [50, 500];
* ``refine``: with a refinement model, the last ``refine_iterations`` (paper: 20) are scored by that
  photorealistic text-to-image model instead (full PBR renders, text prompt only), t in [50, 100].

Checkpoints hold the field, Adam's moments and every random state, so a run stopped at any point and started
again ends where an uninterrupted run ends.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from idto3d.core.atomic import atomic_write
from idto3d.core.config import Config, TextureConfig
from idto3d.core.device import resolve_device
from idto3d.core.errors import IdtoError
from idto3d.core.run_layout import RunLayout, SDSFiles
from idto3d.core.stored_files import load_npz_file
from idto3d.geometry.mesh_clean import clean_meshes
from idto3d.priors.conventions import LEGACY_PROMPTS, Conventions, legacy
from idto3d.priors.guidance import GuidanceCond, ScoreDistillation, get_schedule
from idto3d.render.backend import Rasterizer
from idto3d.render.camera import Camera, orbit_camera, view_word
from idto3d.render.mesh import Mesh
from idto3d.render.preview import save_png
from idto3d.render.pseudo_albedo import FLAT_LIGHT, render_pseudo_albedo
from idto3d.stages.sds_runner import (SDSProgress, SDSStage, SDSStep, conditioning_key, draw_views, embedding_on,
                                      finished, preview_resolution, run_sds, stage_rasterizer, write_done)
from idto3d.stages.stage_keys import meshes_digest
from idto3d.texture.chart_layout import head_layout
from idto3d.texture.lighting import LightingSampler
from idto3d.texture.texels import TexelMap, texel_map
from idto3d.texture.texture_field import TextureField, build_texture_field, texture_optimizer
from idto3d.texture.uv_atlas import UVMesh, shared_atlas

PROMPT = LEGACY_PROMPTS["albedo"]  # priors without conventions (and oracles) keep this prompt
SCHEDULE = {"diffuse": "texture_diffuse", "pbr": "texture_pbr", "refine": "refine"}
CONDITIONED_ON = "identity, prompt or geometry"


@dataclass
class TexturedExpression:
    """One expression's surface as the texture stage sees it."""

    atlas: UVMesh
    mesh: Mesh                 # welded, for rendering (smooth normals across UV seams)
    uv: torch.Tensor           # [V', 2] per seam-split vertex
    attribute_faces: torch.Tensor
    texels: TexelMap

    @classmethod
    def from_atlas(cls, atlas: UVMesh, size: int) -> "TexturedExpression":
        mesh, uv, faces = atlas.render_inputs()
        return cls(atlas, mesh, uv, faces, texel_map(atlas, size))

    def to(self, device: torch.device | str) -> "TexturedExpression":
        return TexturedExpression(self.atlas, self.mesh.to(device), self.uv.to(device),
                                  self.attribute_faces.to(device), self.texels.to(device))


@dataclass
class TextureStageResult(SDSProgress):
    field: TextureField
    expressions: dict[str, TexturedExpression]


def substage_at(iteration: int, cfg: TextureConfig, refine: bool) -> str:
    """``diffuse``, ``pbr`` or ``refine`` for ``iteration`` of ``cfg.iterations`` (see the module docstring)."""
    total = cfg.iterations
    n_refine = min(cfg.refine_iterations, total) if refine else 0
    if iteration >= total - n_refine:
        return "refine"
    return "diffuse" if iteration < round(cfg.diffuse_fraction * total) else "pbr"


def texture_prompts(cameras: Camera, subject: str, template: str | Conventions = PROMPT) -> list[str]:
    """One prompt per camera: from a template with {view} and {subject}, or from a prior's conventions."""
    words = view_word(cameras.azimuth_deg.cpu())
    if isinstance(template, Conventions):
        return [template.prompt(w, subject) for w in words]
    return [template.format(view=w, subject=subject) for w in words]


# ---------------------------------------------------------------- atlas on disk

_ATLAS_KEYS = ("vertices", "faces", "uvs", "vmapping")


def save_atlases(path: Path, atlases: dict[str, UVMesh]) -> None:
    arrays = {f"{name}.{k}": getattr(a, k) for name, a in atlases.items() for k in _ATLAS_KEYS}

    def write(p: Path) -> None:
        with p.open("wb") as fh:
            np.savez(fh, **arrays)

    atomic_write(path, write)


def load_atlases(path: Path, names: list[str]) -> dict[str, UVMesh]:
    data = load_npz_file(path)
    missing = [n for n in names if f"{n}.faces" not in data]
    if missing:
        raise IdtoError(f"{path} has no UV atlas for {missing}; pass --overwrite to start the run over")
    return {n: UVMesh(*(data[f"{n}.{k}"] for k in _ATLAS_KEYS)) for n in names}


def unwrap_expressions(meshes: dict[str, Mesh]) -> dict[str, UVMesh]:
    """UV atlases of the stage's meshes (one shared layout where the topology allows), after cleaning them
    (``geometry.mesh_clean``: one body, manifold, closed, and Taubin-smoothed: they come from the DMTet grid),
    laid out in a few large charts (``texture.chart_layout.head_layout``)."""
    cleaned = clean_meshes([m.detach().cpu() for m in meshes.values()], smooth=True)
    return dict(zip(meshes, shared_atlas(cleaned, head_layout)))


def prepare_expressions(path: Path, meshes: dict[str, Mesh], size: int) -> dict[str, TexturedExpression]:
    """Unwrap the expression meshes, or reload the run's atlas at ``path`` (``RunLayout.atlas``: the texture
    stage and the photo texture share one layout), and map their texels."""
    names = list(meshes)
    if path.exists():
        atlases = load_atlases(path, names)
    else:
        atlases = unwrap_expressions(meshes)
        save_atlases(path, atlases)
    return {n: TexturedExpression.from_atlas(a, size) for n, a in atlases.items()}


# ---------------------------------------------------------------- previews


@torch.no_grad()
def albedo_views(field: TextureField, index: int, expr: TexturedExpression, resolution: int,
                 n_views: int = 4) -> np.ndarray:
    """``[H, n_views*W, 3]`` uint8: the albedo from the front, side, back and other side (flat light)."""
    expr = expr.to(next(field.parameters()).device)
    tex = field.bake(index, expr.texels)
    az = torch.linspace(0.0, 360.0, n_views + 1)[:-1]
    az = torch.where(az > 180.0, az - 360.0, az)
    cams = orbit_camera(torch.full_like(az, 10.0), az, torch.full_like(az, 3.0), torch.full_like(az, 40.0),
                        device=expr.mesh.device)
    light = FLAT_LIGHT if expr.mesh.device.type == "cpu" else FLAT_LIGHT.to(expr.mesh.device)
    img = render_pseudo_albedo(expr.mesh, cams, resolution, tex["albedo"], tex["roughness"], tex["metallic"],
                               light, uv=expr.uv, attribute_faces=expr.attribute_faces,
                               diffuse_only=True).image
    return (torch.cat(list(img), dim=1).clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


@torch.no_grad()
def save_texture_progress(field: TextureField, expressions: dict[str, TexturedExpression], path: Path,
                          resolution: int) -> None:
    """One row per expression: four albedo views, then the albedo UV map."""
    rows = []
    for i, expr in enumerate(expressions.values()):
        views = albedo_views(field, i, expr, resolution)
        uvmap = field.bake(i, expr.texels.to(next(field.parameters()).device))["albedo"].permute(2, 0, 1)[None]
        uvmap = torch.nn.functional.interpolate(uvmap, size=(resolution, resolution), mode="bilinear",
                                                antialias=True, align_corners=False)[0].permute(1, 2, 0)
        uvmap = (uvmap.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()
        rows.append(np.concatenate([views, uvmap], axis=1))
    save_png(np.concatenate(rows, axis=0), path)


# ---------------------------------------------------------------- the stage


@dataclass
class _TextureStep:
    """One iteration: an expression, ``texture.batch_size`` orbit cameras and an environment map; the baked
    textures rendered as eq. 7's pseudo-albedo and scored by the sub-stage's guidance."""

    cfg: Config
    field: TextureField
    surfaces: dict[str, TexturedExpression]  # on the device
    lighting: LightingSampler
    guidance: ScoreDistillation
    refine_guidance: ScoreDistillation | None
    sampler: torch.Generator
    id_embedding: torch.Tensor | None        # on the device
    subject: str
    device: torch.device
    rasterizer: Rasterizer

    def __call__(self, it: int) -> SDSStep:
        tcfg, names = self.cfg.texture, self.cfg.expressions
        sub = substage_at(it, tcfg, self.refine_guidance is not None)
        e, cams = draw_views(self.sampler, len(names), tcfg.batch_size, self.cfg.render.camera)
        env = self.lighting.sample(self.sampler)
        shading = "diffuse" if sub == "diffuse" else "pbr"
        if sub == "refine":  # the text-to-image model knows no identity or expression
            g = self.refine_guidance
            cond = GuidanceCond(prompts=texture_prompts(cams, self.subject, tcfg.refine_prompt),
                                cameras=cams.to(self.device), expression_indices=[e] * len(cams), lighting=env,
                                shading=shading)
        else:
            g = self.guidance
            conv = getattr(g, "conventions", None) or legacy("albedo")
            cond = GuidanceCond(prompts=texture_prompts(cams, self.subject, conv), id_embedding=self.id_embedding,
                                negative_prompt=conv.negative_prompt,
                                expressions=[names[e]] * len(cams), cameras=cams.to(self.device),
                                expression_indices=[e] * len(cams), lighting=env, shading=shading)
        assert g is not None
        g.schedule = get_schedule(SCHEDULE[sub])
        expr = self.surfaces[names[e]]
        maps = self.field.bake(e, expr.texels)
        images = render_pseudo_albedo(expr.mesh, cond.cameras, self.cfg.render.resolution, maps["albedo"],
                                      maps["roughness"], maps["metallic"], env, uv=expr.uv,
                                      attribute_faces=expr.attribute_faces, diffuse_only=sub == "diffuse",
                                      rasterizer=self.rasterizer).for_guidance()
        out = g(images, cond, it)
        record = {"it": it, "expression": names[e], "substage": sub, "t": out.t, "light": env.name,
                  "light_rotation": round(env.rotation_deg, 2),
                  "azimuth": [round(a, 2) for a in cams.azimuth_deg.tolist()]}
        return SDSStep(record, {"loss": out.loss}, out.finite)


def _stage(files: SDSFiles, cfg: Config, guidances: dict[str, ScoreDistillation | None], field: TextureField,
           key: str, lighting: LightingSampler) -> SDSStage:
    tcfg = cfg.texture
    return SDSStage("texture", files, CONDITIONED_ON, key, field, texture_optimizer(field, tcfg.lr), guidances,
                    cfg.seed + 1, tcfg.iterations, tcfg.checkpoint_every, tcfg.preview_every, tcfg.max_bad_steps,
                    "Lower texture.lr or prior.guidance.guidance_scale, or check the albedo prior",
                    cfg.runtime.log_every, f"texture SDS ({lighting.source})")


def run_texture_stage(run_dir: str | Path, cfg: Config, guidance: ScoreDistillation, meshes: dict[str, Mesh], *,
                      id_embedding: torch.Tensor | None = None, subject: str = "a person",
                      refine_guidance: ScoreDistillation | None = None, progress: bool = True,
                      console: Console | None = None, stop_after: int | None = None,
                      init_state: dict | None = None) -> TextureStageResult:
    """Run (or resume, or reuse when finished) the texture SDS stage in ``run_dir`` (prepared by the caller:
    ``stages.run_folder.prepare_run``) on ``meshes`` (one per expression of ``cfg.expressions``, in that order:
    the geometry stage's output).

    ``guidance`` scores pseudo-albedo renders (the albedo prior, or an oracle); its timestep schedule is set
    per sub-stage. ``refine_guidance`` (schedule ``refine``) scores the last ``texture.refine_iterations``;
    None = no refinement. ``stop_after`` stops after that many iterations of this call (checkpointed).
    ``init_state`` is a texture-field state to start from (the photo texture) instead of the fresh grey field.
    """
    layout = RunLayout(run_dir)
    tcfg, names = cfg.texture, list(cfg.expressions)
    if list(meshes) != names:
        raise IdtoError(f"the texture stage needs one mesh per expression {names}, got {list(meshes)}")
    key = conditioning_key(id_embedding, subject) + meshes_digest(meshes)  # tied to its geometry
    device = resolve_device(cfg.runtime.device)
    # Fails early on a bad environment folder, before unwrapping or any SDS step.
    lighting = LightingSampler(tcfg, cfg.seed, console, progress, device=device)
    expressions = prepare_expressions(layout.atlas, meshes, tcfg.resolution)
    field = build_texture_field(tcfg, len(names), seed=cfg.seed, fast_paths=cfg.runtime.fast_paths, device=device)
    done = finished(layout.texture_sds, key, field, CONDITIONED_ON)
    if done is not None:
        return TextureStageResult(**asdict(done), field=field, expressions=expressions)

    field.to(device)
    spec = _stage(layout.texture_sds, cfg, {"guidance": guidance, "refine_guidance": refine_guidance}, field, key,
                  lighting)
    step = _TextureStep(cfg, field, {n: x.to(device) for n, x in expressions.items()}, lighting, guidance,
                        refine_guidance, spec.sampler, embedding_on(id_embedding, device), subject, device,
                        stage_rasterizer(cfg, device))
    res = preview_resolution(cfg.render.resolution)
    run = run_sds(spec, step, lambda: save_texture_progress(field, expressions, spec.files.progress, res),
                  stop_after=stop_after, console=console, progress=progress,
                  on_fresh=(lambda: field.load_state_dict(init_state)) if init_state is not None else None)
    if run.iterations == tcfg.iterations:
        write_done(spec.files, run, key, names, lighting=lighting.source, refined=refine_guidance is not None,
                   texture_resolution=tcfg.resolution,
                   texel_coverage={n: round(x.texels.coverage, 4) for n, x in expressions.items()})
    return TextureStageResult(**asdict(run), field=field, expressions=expressions)
