"""``idto3d generate``: photos (or an identity file) -> identity -> template fit -> geometry SDS -> export."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from idto3d.config import Config
from idto3d.errors import IdtoError
from idto3d.geometry.mesh_io import save_mesh
from idto3d.identity.io import IdentityEmbedding, load_identity
from idto3d.pipeline.geometry_stage import GeometryStageResult, run_geometry_stage
from idto3d.pipeline.run_folder import ensure_init, prepare_run

IDENTITY_FILE = "identity.safetensors"


@dataclass
class GenerateResult:
    run_dir: Path
    identity: IdentityEmbedding
    geometry: GeometryStageResult | None = None   # None: no normal prior, stopped after the template fit
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


def check_prior_for_identity(prior, ident: IdentityEmbedding, ref: str) -> None:
    spec = prior.spec
    if spec.domain != "normal":
        raise IdtoError(f"prior {ref} is a '{spec.domain}' prior; the geometry stage needs a normal prior "
                        f"(--normal-prior / prior.normal)")
    if ident.dim != spec.id_dim:
        raise IdtoError(f"the identity has {ident.dim} values ({ident.backend}) but normal prior {ref} expects "
                        f"{spec.id_dim}-D ID embeddings: compute the identity with the matching backend "
                        f"(identity.backend: dlib = 128, arcface = 512) or use a prior built for id_dim={ident.dim}")


def export_meshes(meshes: dict, run_dir: Path) -> list[Path]:
    paths = []
    for name, mesh in meshes.items():
        for ext in (".ply", ".obj"):
            paths.append(save_mesh(mesh, run_dir / "export" / f"{name}{ext}"))
    return paths


def generate(inputs: Sequence[str | Path], run_dir: str | Path, cfg: Config, *, normal_prior: str | None = None,
             prompt: str | None = None, overwrite: bool = False, console: Console | None = None,
             progress: bool = True, stop_after: int | None = None) -> GenerateResult:
    """Run the pipeline in ``run_dir``; re-running the same call resumes it (finished steps are reused)."""
    run_dir = prepare_run(run_dir, cfg, overwrite)
    ident = resolve_identity(inputs, run_dir, cfg, console, progress)
    ref = normal_prior or cfg.prior.normal
    prior = None
    if ref:
        from idto3d.priors.model import load_prior

        prior = load_prior(ref)  # loaded and checked before the template fit spends any time
        check_prior_for_identity(prior, ident, str(ref))
    ensure_init(run_dir, cfg, console, progress)
    if prior is None:
        return GenerateResult(run_dir, ident, missing=(
            "no normal prior: the template fit is done (geometry/init_*.ply); pass --normal-prior FOLDER "
            "(a prior saved by `idto3d train-prior normal`) or set prior.normal to run the geometry stage"))
    from idto3d.priors.guidance import SDSGuidance

    guidance = SDSGuidance(prior, cfg.prior.guidance, "geometry", max(cfg.geometry.iterations, 1), seed=cfg.seed)
    geo = run_geometry_stage(run_dir, cfg, guidance, id_embedding=ident.embedding,
                             subject=prompt or "a person", progress=progress, console=console,
                             stop_after=stop_after)
    if geo.iterations < cfg.geometry.iterations:
        return GenerateResult(run_dir, ident, geo, missing=f"stopped at iteration {geo.iterations} on request")
    return GenerateResult(run_dir, ident, geo, export_meshes(geo.meshes, run_dir))
