"""``idto3d generate``: photos (or an identity file) -> identity -> initial geometry -> geometry SDS -> texture
(photo texture and/or texture SDS) -> export (GLB/OBJ + PBR maps, turntables)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from idto3d.core.config import Config, dump_config
from idto3d.core.device import resolve_device, resolve_dtype
from idto3d.core.errors import IdtoError
from idto3d.core.progress import current_pipeline, pipeline, pipeline_stage, progress_every
from idto3d.core.run_layout import RunLayout
from idto3d.export import PBRMaps, UVMesh
from idto3d.identity.io import IdentityEmbedding, load_identity
from idto3d.render.mesh import Mesh
from idto3d.stages.export_stage import baked_maps, export_run, exported_files, grey_maps
from idto3d.stages.geometry_stage import GeometryStageResult, current_meshes, geometry_schedule, run_geometry_stage
from idto3d.stages.initial_geometry import ensure_init
from idto3d.stages.offline_head import ensure_offline_heads, mouth_maps
from idto3d.stages.photo_texture_stage import PhotoTextureResult, run_photo_texture
from idto3d.stages.run_folder import RunFolder, describe_inputs, open_run
from idto3d.stages.stage_keys import export_key
from idto3d.stages.subject_init import SubjectFit, subject_for_run, subject_targets
from idto3d.stages.texture_stage import TextureStageResult, run_texture_stage, unwrap_expressions

NO_PHOTOS = ("the identity's photos are not at hand, so the head starts from the generic template (no face fit, no "
             "photo texture); give the photos instead of the identity file to fit the face")
NO_NORMAL_PRIOR = ("no normal prior: the geometry is the face-model fit stitched into the template (pass "
                   "--normal-prior to refine it with the geometry SDS stage)")
PHOTO_TEXTURE_ONLY = ("no albedo prior: the texture comes from the photos (regions no photo sees get the mean skin "
                      "tone); pass --albedo-prior to run the texture SDS stage")
GREY_ONLY = ("no albedo prior: the meshes were exported with a plain grey material; pass --albedo-prior FOLDER or "
             "set prior.albedo to run the texture stage")


@dataclass
class GenerateResult:
    run_dir: Path
    identity: IdentityEmbedding
    geometry: GeometryStageResult | None = None   # None: no normal prior (the geometry is the subject fit)
    texture: TextureStageResult | None = None     # None: no albedo prior, or not reached
    photo: PhotoTextureResult | None = None       # the offline photo texture (None: no photos at hand)
    person: SubjectFit | None = None              # the face-model fit and the photos' cameras
    exported: list[Path] = field(default_factory=list)
    missing: str | None = None                     # what stopped the run early, or what it did without, for the user
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each step this call ran or reused


def _is_identity_file(inputs: Sequence[Path]) -> bool:
    return len(inputs) == 1 and inputs[0].suffix.lower() == ".safetensors"


def resolve_identity(inputs: Sequence[str | Path], run_dir: Path, cfg: Config,
                     console: Console | None = None, progress: bool = True, reuse: bool = False) -> IdentityEmbedding:
    """The run's ``identity.safetensors``: copied from a given identity file, or computed from photos
    (aligned crops in ``crops/``). ``reuse``: the run was made from these same inputs and config, so an identity
    it holds is theirs and is read back instead of computed again."""
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise IdtoError("give 1-5 photos of one person (files or folders), or one identity .safetensors file")
    layout = RunLayout(run_dir)
    out = layout.identity
    if reuse and out.is_file():
        return load_identity(out)
    if _is_identity_file(inputs):
        load_identity(inputs[0])  # validates before anything is copied
        if inputs[0].resolve() != out.resolve():
            from idto3d.core.atomic import atomic_write

            atomic_write(out, lambda p: shutil.copyfile(inputs[0], p))
        return load_identity(out)
    if any(p.suffix.lower() == ".safetensors" for p in inputs):
        raise IdtoError("give either photos or a single identity .safetensors file, not both")
    from idto3d.identity.extract import compute_identity

    return compute_identity(inputs, out, cfg.identity, crops_dir=layout.crops, console=console,
                            show_progress=progress)


def check_one_person(ident: IdentityEmbedding) -> None:
    """Stop before any compute when the photos (that the identity uses) look like different people."""
    flagged = [Path(str(p.get("path", "?"))).name for p in ident.photos if p.get("used", True)
               and any(f in str(p.get("quality", "")) for f in ("outlier", "may not be the same person"))]
    if flagged:
        raise IdtoError(f"the photos do not all show one person (identity outliers: {', '.join(flagged)}); "
                        f"remove the other person's photos, or pass --drop-outliers (identity.drop_outliers) "
                        f"to leave outliers out when they are a minority")


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
    from idto3d.priors.recogniser import check_recogniser

    check_recogniser(spec.recogniser, ident.recogniser, ref, str(ident.path or "the identity"))


def _load_checked(ref: str | None, ident: IdentityEmbedding, domain: str, cfg: Config) -> Any:
    if not ref:
        return None
    from idto3d.priors.prior import load_prior
    from idto3d.priors.prior_runtime import configure_prior

    # Loaded straight onto the run's device in its precision (no fp32 copy on the host first).
    device = resolve_device(cfg.runtime.device)
    # prior.base_model / prior.vae stand in for a recorded base that is not on this machine (another's path)
    prior = load_prior(ref, device=device, dtype=resolve_dtype(cfg.runtime.precision, device),
                       base_model=cfg.prior.base_model, vae=cfg.prior.vae, prefer_recorded=True)
    check_prior_for_identity(prior, ident, str(ref), domain)
    if prior.needs_face_features:
        give_face_features(prior, ident, str(ref))
    return configure_prior(prior, cfg.runtime, device)


def give_face_features(prior, ident: IdentityEmbedding, ref: str) -> None:
    """FaceID Plus: CLIP features of the identity's aligned faces (the photos it used), with the image encoder
    the prior records (``identity.clip_face``)."""
    from idto3d.identity.clip_face import face_clip_features

    used = [i for i, p in enumerate(ident.photos) if p.get("used", True)]
    photos = [Path(str(ident.photos[i].get("path", ""))) for i in used]
    missing = [str(p) for p in photos if not p.is_file()]
    if not photos or missing:
        raise IdtoError(f"prior {ref} is IP-Adapter FaceID Plus: it reads the face from the photos, but "
                        f"{missing[0] if missing else 'the identity names no photo'} is not on this machine; "
                        f"generate from the photos instead of an identity file")
    feats = face_clip_features(photos, ident.landmarks[used].numpy(), prior.spec.id_projection["image_encoder"])
    prior.set_face_features(feats.cond, feats.uncond)


def _guidance(prior, cfg: Config, schedule, iterations: int, seed: int):
    from idto3d.priors.guidance import SDSGuidance

    return SDSGuidance(prior, cfg.prior.guidance, schedule, max(iterations, 1), seed=seed)


def _refine_guidance(cfg: Config):
    """The texture stage's last iterations' photorealistic text-to-image guidance, when configured."""
    if not (cfg.texture.refine_model and cfg.texture.refine_iterations > 0):
        return None
    from idto3d.priors.prior import load_photo_prior
    from idto3d.priors.prior_runtime import configure_prior

    device = resolve_device(cfg.runtime.device)
    photo_prior = load_photo_prior(cfg.texture.refine_model, vae=cfg.prior.vae, device=device,
                                   dtype=resolve_dtype(cfg.runtime.precision, device))
    return _guidance(configure_prior(photo_prior, cfg.runtime, device), cfg, "refine", cfg.texture.iterations,
                     cfg.seed + 2)


class _Clock:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self._t
        self._t = now


def _remaining(stop_after: int | None, done_now: int) -> int | None:
    return None if stop_after is None else max(stop_after - done_now, 0)


def _start(inputs: Sequence[str | Path], run: RunFolder, cfg: Config, reuse: bool,
           priors: tuple[str | None, str | None], console: Console | None, progress: bool, clock: _Clock
           ) -> tuple[IdentityEmbedding, Any, Any]:
    """The run's identity and both priors, loaded and checked before the template fit spends any time (and before
    ``--overwrite`` removes anything): ``(identity, normal prior, albedo prior)``."""
    with pipeline_stage("identity + priors", console, progress):
        ident = resolve_identity(inputs, run.layout.root, cfg, console, progress, reuse=reuse)
        clock.lap("identity")
        check_one_person(ident)
        normal = _load_checked(priors[0], ident, "normal", cfg)
        albedo = _load_checked(priors[1], ident, "albedo", cfg)
    return ident, normal, albedo


def _same_run(run: RunFolder, cfg: Config, record: dict[str, Any]) -> bool:
    """Whether the folder was made from these inputs with this config (so its identity is theirs)."""
    return (run.manifest.inputs == record and run.layout.config.is_file()
            and run.layout.config.read_text(encoding="utf-8") == dump_config(cfg))


def _export_source(run_dir: Path, tex: TextureStageResult | None, photo: PhotoTextureResult | None,
                   meshes: dict[str, Mesh], size: int) -> tuple[dict[str, UVMesh], Callable[[int, str, UVMesh], PBRMaps]]:
    """What the export bakes: the texture SDS result, else the photo texture, else a plain grey material."""
    textured = tex if tex is not None else photo
    if textured is not None and tex is None and _one_layout(photo):
        # The offline heads share one UV layout: the neutral's maps follow every expression's surface texel for
        # texel (the field is 3-D, so baking a moved jaw would read the neck's colours at its new place).
        first = next(iter(photo.expressions.values())).atlas
        neutral = mouth_maps(run_dir, baked_maps(photo.field, 0, first, size), first)
        return {n: x.atlas for n, x in photo.expressions.items()}, lambda i, name, atlas: neutral
    if textured is not None:
        return ({n: x.atlas for n, x in textured.expressions.items()},
                lambda i, name, atlas: baked_maps(textured.field, i, atlas, size))
    return unwrap_expressions(meshes), lambda i, name, atlas: grey_maps()


def _texture_marker(tex: TextureStageResult | None, photo: PhotoTextureResult | None) -> dict | None:
    """What identifies the texture the export bakes: the texture SDS's iterations on the photo texture's key."""
    if tex is not None:
        return {"texture_sds": tex.iterations, "photo": photo.report.get("key") if photo is not None else None}
    return {"photo": photo.report.get("key")} if photo is not None else None


def _one_layout(photo: PhotoTextureResult) -> bool:
    atlases = [x.atlas for x in photo.expressions.values()]
    return all(a.faces.shape == atlases[0].faces.shape and (a.faces == atlases[0].faces).all()
               and (a.uvs == atlases[0].uvs).all() for a in atlases[1:])


def generate(inputs: Sequence[str | Path], run_dir: str | Path, cfg: Config, *, normal_prior: str | None = None,
             albedo_prior: str | None = None, prompt: str | None = None, overwrite: bool = False,
             console: Console | None = None, progress: bool = True, stop_after: int | None = None,
             field_offline: bool = False) -> GenerateResult:
    """Run the pipeline in ``run_dir``; re-running the same call resumes it (finished steps are reused).

    ``stop_after`` stops after that many SDS iterations of this call, counted across the geometry and texture
    stages (checkpointed; the next call goes on from there). ``field_offline``: without a normal prior, regress the
    DMTet field to the fitted heads and export its remesh anyway (the offline path before the stitched
    full-resolution head; ``bench generate`` times it as its baseline).
    """
    clock = _Clock()
    if progress:
        progress_every()  # a bad IDTO3D_PROGRESS_EVERY is refused now, not when the first loop starts
    refs = (normal_prior or cfg.prior.normal, albedo_prior or cfg.prior.albedo)
    record = {**describe_inputs(inputs), "priors": {"normal": refs[0], "albedo": refs[1]}}
    with open_run(run_dir, console) as run, pipeline(_planned_stages(inputs, cfg, refs)):
        run.check(cfg, record, overwrite)  # another config or person: refused before anything is written
        reuse = not overwrite and _same_run(run, cfg, record)
        ident, normal, albedo = _start(inputs, run, cfg, reuse, refs, console, progress, clock)
        run.begin(cfg, record, overwrite)
        return _pipeline(run.layout.root, cfg, ident, normal, albedo, prompt, console, progress, stop_after, clock,
                         field_offline)


def _planned_stages(inputs: Sequence[str | Path], cfg: Config, refs: tuple[str | None, str | None]) -> list[str]:
    """The stages a run will go through, for the progress's 'stage k/n' (one not needed is dropped later)."""
    photos = cfg.face_model.enabled and not _is_identity_file([Path(p) for p in inputs])
    return (["identity + priors", "face fit", "head"] + (["geometry SDS"] if refs[0] else [])
            + (["photo texture"] if photos else []) + (["texture SDS"] if refs[1] else []) + ["export"])


def _pipeline(run_dir: Path, cfg: Config, ident: IdentityEmbedding, normal: Any, albedo: Any, prompt: str | None,
              console: Console | None, progress: bool, stop_after: int | None, clock: _Clock,
              field_offline: bool = False) -> GenerateResult:
    """The stages, in the held run folder."""
    device = resolve_device(cfg.runtime.device)
    with pipeline_stage("face fit", console, progress):
        person = subject_for_run(run_dir, cfg, ident, console if progress else None)
    clock.lap("face fit")
    if person is None and current_pipeline() is not None:
        current_pipeline().skip("photo texture")
    targets = (lambda: subject_targets(person, cfg)) if person is not None else None
    # The field is regressed only for the geometry SDS stage to start from; offline, the fit is exported as is.
    offline = normal is None and person is not None and not field_offline
    with pipeline_stage("head", console, progress):
        init = None if offline else ensure_init(run_dir, cfg, console, progress, targets=targets, device=device,
                                                photos=person.photos if person is not None else None)
        meshes = ensure_offline_heads(run_dir, cfg, person) if offline else None
    clock.lap("offline head" if offline else "template regression")
    notes = [NO_PHOTOS] if cfg.face_model.enabled and person is None else []
    subject, geo, tex, photo = prompt or "a person", None, None, None
    if normal is not None:
        guidance = _guidance(normal, cfg, geometry_schedule(cfg.geometry), cfg.geometry.iterations, cfg.seed)
        with pipeline_stage("geometry SDS", console, progress):
            geo = run_geometry_stage(run_dir, cfg, guidance, init, id_embedding=ident.embedding, subject=subject,
                                     progress=progress, console=console, stop_after=stop_after)
        if geo.iterations < cfg.geometry.iterations:
            return GenerateResult(run_dir, ident, geo, missing=f"stopped at geometry iteration {geo.iterations} "
                                                               f"on request")
        stop_after = _remaining(stop_after, geo.iterations - geo.resumed_from)
        meshes = geo.meshes
        clock.lap("geometry SDS")
    else:
        meshes = meshes if offline else current_meshes(init, list(cfg.expressions))
        notes.append(NO_NORMAL_PRIOR)
    if person is not None:
        with pipeline_stage("photo texture", console, progress):
            photo = run_photo_texture(run_dir, cfg, meshes, person, console=console, progress=progress,
                                      device=device)
        clock.lap("photo texture")
    if albedo is not None:
        tex_guidance = _guidance(albedo, cfg, "texture_diffuse", cfg.texture.iterations, cfg.seed + 1)
        start = photo.field.state_dict() if photo is not None else None  # the SDS refines the photo texture
        with pipeline_stage("texture SDS", console, progress):
            tex = run_texture_stage(run_dir, cfg, tex_guidance, meshes, id_embedding=ident.embedding,
                                    subject=subject, refine_guidance=_refine_guidance(cfg), progress=progress,
                                    console=console, stop_after=stop_after, init_state=start)
        clock.lap("texture SDS")
        if tex.iterations < cfg.texture.iterations:
            return GenerateResult(run_dir, ident, geo, texture=tex, photo=photo,
                                  missing=f"stopped at texture iteration {tex.iterations} on request")
    else:
        notes.append(PHOTO_TEXTURE_ONLY if photo is not None else GREY_ONLY)
    key = export_key(cfg, _texture_marker(tex, photo), meshes)
    with pipeline_stage("export", console, progress):
        files = exported_files(run_dir, key)  # a finished export is reused: its source (UV unwrap) is not built
        if not files:
            atlases, maps_for = _export_source(run_dir, tex, photo, meshes, cfg.export.texture_size)
            files = export_run(run_dir, cfg, atlases, maps_for, console=console, progress=progress, key=key)
    clock.lap("export")
    return GenerateResult(run_dir, ident, geo, texture=tex, photo=photo, person=person, exported=files,
                          missing="; ".join(notes) or None, seconds=clock.laps)
