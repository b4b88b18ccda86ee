"""``idto3d generate``: photos (or an identity file) -> identity -> template fit -> geometry SDS -> texture SDS
-> export (GLB/OBJ + PBR maps, turntables)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from idto3d.config import Config
from idto3d.errors import IdtoError
from idto3d.identity.io import IdentityEmbedding, load_identity
from idto3d.pipeline.export_run import baked_maps, export_run, exported_files, grey_maps
from idto3d.pipeline.geometry_stage import GeometryStageResult, run_geometry_stage
from idto3d.pipeline.texture_stage import TextureStageResult, run_texture_stage
from idto3d.pipeline.run_folder import ensure_init, prepare_run

IDENTITY_FILE = "identity.safetensors"


@dataclass
class GenerateResult:
    run_dir: Path
    identity: IdentityEmbedding
    geometry: GeometryStageResult | None = None   # None: no normal prior, stopped after the template fit
    texture: TextureStageResult | None = None     # None: no albedo prior (grey export), or not reached
    exported: list[Path] = field(default_factory=list)
    missing: str | None = None                     # what stopped the run early, for the user


def _is_identity_file(inputs: Sequence[Path]) -> bool:
    return len(inputs) == 1 and inputs[0].suffix.lower() == ".safetensors"


def resolve_identity(inputs: Sequence[str | Path], run_dir: Path, cfg: Config,
                     console: Console | None = None, progress: bool = True) -> IdentityEmbedding:
    """The run's ``identity.safetensors``: copied from a given identity file, or computed from photos
    (aligned crops in ``crops/``)."""
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise IdtoError("give 1-5 photos of one person (files or folders), or one identity .safetensors file")
    out = run_dir / IDENTITY_FILE
    if _is_identity_file(inputs):
        ident = load_identity(inputs[0])  # validates before anything is copied
        if inputs[0].resolve() != out.resolve():
            from idto3d.atomic import atomic_write

            atomic_write(out, lambda p: shutil.copyfile(inputs[0], p))
        return load_identity(out)
    if any(p.suffix.lower() == ".safetensors" for p in inputs):
        raise IdtoError("give either photos or a single identity .safetensors file, not both")
    from idto3d.identity.extract import compute_identity

    return compute_identity(inputs, out, cfg.identity, crops_dir=run_dir / "crops", console=console,
                            show_progress=progress)


def check_prior_for_identity(prior, ident: IdentityEmbedding, ref: str, domain: str = "normal") -> None:
    spec = prior.spec
    stage, option = {"normal": ("geometry", "--normal-prior / prior.normal"),
                     "albedo": ("texture", "--albedo-prior / prior.albedo")}[domain]
    if spec.domain != domain:
        article = "an" if domain[0] in "aeiou" else "a"
        raise IdtoError(f"prior {ref} is a '{spec.domain}' prior; the {stage} stage needs {article} {domain} prior "
                        f"({option})")
    if ident.dim != spec.id_dim:
        raise IdtoError(f"the identity has {ident.dim} values ({ident.backend}) but {domain} prior {ref} expects "
                        f"{spec.id_dim}-D ID embeddings: compute the identity with the matching backend "
                        f"(identity.backend: dlib = 128, arcface = 512) or use a prior built for id_dim={ident.dim}")


def _load_checked(ref: str | None, ident: IdentityEmbedding, domain: str):
    if not ref:
        return None
    from idto3d.priors.model import load_prior

    prior = load_prior(ref)
    check_prior_for_identity(prior, ident, str(ref), domain)
    return prior


def _remaining(stop_after: int | None, done_now: int) -> int | None:
    return None if stop_after is None else max(stop_after - done_now, 0)


def generate(inputs: Sequence[str | Path], run_dir: str | Path, cfg: Config, *, normal_prior: str | None = None,
             albedo_prior: str | None = None, prompt: str | None = None, overwrite: bool = False,
             console: Console | None = None, progress: bool = True, stop_after: int | None = None) -> GenerateResult:
    """Run the pipeline in ``run_dir``; re-running the same call resumes it (finished steps are reused).

    ``stop_after`` stops after that many SDS iterations of this call, counted across the geometry and texture
    stages (checkpointed; the next call goes on from there).
    """
    run_dir = prepare_run(run_dir, cfg, overwrite)
    ident = resolve_identity(inputs, run_dir, cfg, console, progress)
    # Both priors are loaded and checked before the template fit spends any time.
    normal = _load_checked(normal_prior or cfg.prior.normal, ident, "normal")
    albedo = _load_checked(albedo_prior or cfg.prior.albedo, ident, "albedo")
    ensure_init(run_dir, cfg, console, progress)
    if normal is None:
        return GenerateResult(run_dir, ident, missing=(
            "no normal prior: the template fit is done (geometry/init_*.ply); pass --normal-prior FOLDER "
            "(a prior saved by `idto3d train-prior normal`) or set prior.normal to run the geometry stage"))
    from idto3d.priors.guidance import SDSGuidance

    subject = prompt or "a person"
    guidance = SDSGuidance(normal, cfg.prior.guidance, "geometry", max(cfg.geometry.iterations, 1), seed=cfg.seed)
    geo = run_geometry_stage(run_dir, cfg, guidance, id_embedding=ident.embedding, subject=subject,
                             progress=progress, console=console, stop_after=stop_after)
    if geo.iterations < cfg.geometry.iterations:
        return GenerateResult(run_dir, ident, geo, missing=f"stopped at geometry iteration {geo.iterations} on "
                                                           f"request")
    stop_after = _remaining(stop_after, geo.iterations - geo.resumed_from)
    if albedo is None:
        from idto3d.export.uv_atlas import shared_atlas

        files = exported_files(run_dir) or export_run(
            run_dir, cfg, dict(zip(geo.meshes, shared_atlas(list(geo.meshes.values())))),
            lambda i, name, atlas: grey_maps(), console=console, progress=progress)
        return GenerateResult(run_dir, ident, geo, exported=files, missing=(
            "no albedo prior: the meshes were exported with a plain grey material; pass --albedo-prior FOLDER "
            "(a prior saved by `idto3d train-prior albedo`) or set prior.albedo to run the texture stage"))
    tex_guidance = SDSGuidance(albedo, cfg.prior.guidance, "texture_diffuse", max(cfg.texture.iterations, 1),
                               seed=cfg.seed + 1)
    refine = None
    if cfg.texture.refine_model and cfg.texture.refine_iterations > 0:
        from idto3d.priors.model import load_photo_prior

        refine = SDSGuidance(load_photo_prior(cfg.texture.refine_model, vae=cfg.prior.vae), cfg.prior.guidance,
                             "refine", max(cfg.texture.iterations, 1), seed=cfg.seed + 2)
    tex = run_texture_stage(run_dir, cfg, tex_guidance, geo.meshes, id_embedding=ident.embedding, subject=subject,
                            refine_guidance=refine, progress=progress, console=console, stop_after=stop_after)
    if tex.iterations < cfg.texture.iterations:
        return GenerateResult(run_dir, ident, geo, texture=tex,
                              missing=f"stopped at texture iteration {tex.iterations} on request")
    size = cfg.export.texture_size
    files = exported_files(run_dir) or export_run(
        run_dir, cfg, {n: x.atlas for n, x in tex.expressions.items()},
        lambda i, name, atlas: baked_maps(tex.field, i, atlas, size), console=console, progress=progress)
    return GenerateResult(run_dir, ident, geo, texture=tex, exported=files)
