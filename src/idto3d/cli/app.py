"""The ``idto3d`` command line: each command is a thin wrapper over a library function."""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from idto3d import __version__
from idto3d.core.errors import IdtoError

if TYPE_CHECKING:  # imported where used: the CLI starts without loading the pipeline
    from idto3d.core.config import Config
    from idto3d.stages.generate import GenerateResult

app = typer.Typer(name="idto3d", no_args_is_help=True, add_completion=False,
                  help="ID-to-3D: expressive, relightable 3D heads from 1-5 photos via score distillation.")

console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

PresetOpt = Annotated[str | None, typer.Option("--preset", "-p", help="Base preset: preview, paper or miniature.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML file overriding preset keys.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override one key: section.key=value "
                                                  "(repeatable).")]


# File-system errors a user causes (and fixes) with the path or the disk, not bugs: one line, exit 2.
_FS_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EDQUOT}


def _error_line(message: str) -> None:
    # soft_wrap and no newlines: one line whatever the terminal (scripts and tests match on it); escape: a message
    # may hold brackets (pip extras, lists) that rich would take for markup
    console.print(f"[bold red]error:[/] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)


def user_errors(fn: F) -> F:
    """Show user-caused errors as one clear line (exit 2) instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except IdtoError as exc:
            _error_line(str(exc))
            raise typer.Exit(code=2) from None
        except OSError as exc:
            if exc.errno not in _FS_ERRNOS:
                raise
            where = f": {exc.filename}" if exc.filename else ""
            _error_line(f"cannot write{where} ({os.strerror(exc.errno)})")
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            console.print("interrupted; run the same command again to resume", highlight=False, soft_wrap=True)
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"idto3d {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")] = False) -> None:
    """ID-to-3D command line."""


@app.command("config")
@user_errors
def config_cmd(preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the fully resolved, validated config (preset + YAML + overrides) as YAML."""
    from idto3d.core.config import dump_config, load_config

    typer.echo(dump_config(load_config(preset, config, set_)), nl=False)


@app.command("template")
@user_errors
def template_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Mesh file to write (.obj or .ply).")] = Path(
        "head_template.obj"),
    mesh: Annotated[Path | None, typer.Option("--mesh", help="Normalise this mesh instead of the "
                                              "built-in head (must be +Y up, facing +Z).")] = None,
    resolution: Annotated[int, typer.Option(help="Tet grid used to mesh the built-in head.")] = 96,
    preview: Annotated[Path | None, typer.Option(help="Also write a PNG of normal maps from 4 views.")] = None,
) -> None:
    """Write the head template (built-in parametric head, or a user mesh normalised to the working space)."""
    from idto3d.geometry.mesh_io import save_mesh
    from idto3d.geometry.template import build_head_template, load_template

    if resolution <= 0:
        raise IdtoError(f"--resolution must be > 0, got {resolution}")
    template = load_template(mesh) if mesh is not None else build_head_template(resolution)
    save_mesh(template, out)
    console.print(f"wrote {out} ({template.vertices.shape[0]} vertices, {template.faces.shape[0]} faces)")
    if preview is not None:
        from idto3d.render.preview import save_turntable_normals

        save_turntable_normals(template, preview)
        console.print(f"wrote {preview}")


@app.command("render")
@user_errors
def render_cmd(
    mesh: Annotated[Path, typer.Argument(help="Mesh file (OBJ/PLY/GLB/...), +Y up, facing +Z.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG strip to write.")] = Path("normals.png"),
    views: Annotated[int, typer.Option(help="Number of azimuths around the head.")] = 4,
    elevation: Annotated[float, typer.Option(help="Camera elevation in degrees.")] = 10.0,
    resolution: Annotated[int, typer.Option(help="Pixels per view (square).")] = 256,
    normalise: Annotated[bool, typer.Option(help="Centre and scale the mesh into the working space.")] = True,
) -> None:
    """Render camera-space normal maps of a mesh (the paper's geometry proxy) to a PNG strip."""
    from idto3d.geometry.mesh_io import load_mesh
    from idto3d.geometry.template import load_template
    from idto3d.render.preview import save_turntable_normals

    if resolution <= 0 or views <= 0:
        raise IdtoError("--resolution and --views must be > 0")
    m = load_template(mesh) if normalise else load_mesh(mesh)
    save_turntable_normals(m, out, n_views=views, elevation=elevation, resolution=resolution)
    console.print(f"wrote {out}")


@app.command("fit-template")
@user_errors
def fit_template_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the fitted meshes and report.")] = Path(
        "runs/template_fit"),
    preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a run made with a different config.")] = False,
) -> None:
    """Regress the expression-conditioned DMTet field to the template (the geometry stage's initialisation).

    Re-running the same command on a finished folder reuses its result.
    """
    from idto3d.core.config import load_config
    from idto3d.stages.initial_geometry import fit_template

    report = fit_template(out, load_config(preset, config, set_), overwrite=overwrite, console=console)
    rel = ", ".join(f"{r * 100:.3f}%" for r in report.chamfer_relative)
    console.print(f"Chamfer to template / bbox diagonal: {rel}  ({report.seconds:.1f} s) -> {out}")


@app.command("render-dataset")
@user_errors
def render_dataset_cmd(
    scans: Annotated[Path, typer.Argument(help="Scan folder laid out as NPHM: <subject>/<expression>/scan.ply.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the renders and index.jsonl.")],
    metadata: Annotated[Path, typer.Option("--metadata", help="CSV with columns subject, gender, age, ethnicity.")],
    views: Annotated[int, typer.Option(help="Random camera poses per scan.")] = 8,
    resolution: Annotated[int, typer.Option(help="Image size in pixels (square).")] = 512,
    seed: Annotated[int, typer.Option(help="Seed of the camera poses.")] = 0,
    identities: Annotated[Path | None, typer.Option(help="Folder of <subject>.safetensors identity files.")] = None,
    expression_names: Annotated[Path | None, typer.Option(
        "--expression-names", help="Text file: the expression name of folder index i on line i+1.")] = None,
    normals_only: Annotated[bool, typer.Option("--normals-only", help="Render normal maps only "
                                               "(for scans without colour).")] = False,
    up: Annotated[str, typer.Option(help="The scans' up axis (NPHM/FLAME: +y).")] = "+y",
    forward: Annotated[str, typer.Option(help="The axis the scans' faces look along (NPHM/FLAME: +z).")] = "+z",
    preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """Render head scans to normal maps and albedo images with prompts: the priors' fine-tuning data.

    Camera ranges and the rasteriser come from the config's render section. Re-running skips images
    already written.
    """
    from idto3d.core.config import load_config
    from idto3d.priors.training.render_dataset import build_render_dataset, read_expression_names

    cfg = load_config(preset, config, set_)
    names = read_expression_names(expression_names) if expression_names is not None else None
    report = build_render_dataset(scans, out, metadata, views=views, resolution=resolution, seed=seed,
                                  identities=identities, expression_names=names, normals_only=normals_only,
                                  up=up, forward=forward, camera=cfg.render.camera, backend=cfg.render.backend,
                                  console=console)
    console.print(f"{report.images} images of {report.scans} scans ({report.subjects} subjects): "
                  f"{report.rendered} rendered, {report.skipped} already there -> {report.index}")


@app.command("synth-scans")
@user_errors
def synth_scans_cmd(
    out: Annotated[Path, typer.Argument(help="Folder for <subject>/<expression>/scan.ply, subjects.csv, synth.json.")],
    subjects: Annotated[int, typer.Option(help="Number of synthetic subjects.")] = 8,
    expressions: Annotated[str, typer.Option(help="Comma-separated expressions the face model can show.")] =
        "neutral,smile,mouth_open",
    seed: Annotated[int, typer.Option(help="Seed of the subjects' shapes and colours.")] = 0,
    first: Annotated[int, typer.Option(help="Index of the first subject folder (held-out sets start later).")] = 0,
    shape_std: Annotated[float, typer.Option(help="Shape code std in prior-std units.")] = 1.0,
) -> None:
    """Make synthetic head scans with ground truth: random face-model shapes merged into the head template,
    posed in each expression, with vertex colours, in the NPHM layout that render-dataset reads."""
    from idto3d.core.progress import progress_bar
    from idto3d.stages.synth_scans import synth_scans

    names = [n.strip() for n in expressions.split(",") if n.strip()]
    with progress_bar("synth-scans", total=subjects, console=console) as update:
        report = synth_scans(out, subjects=subjects, expressions=names, seed=seed, first=first,
                             shape_std=shape_std, update=update)
    console.print(f"{report.scans} scans of subjects {first:03d}-{first + subjects - 1:03d}: {report.written} "
                  f"written, {report.skipped} already there -> {out} (subjects.csv, synth.json)")


@app.command("synth-identities")
@user_errors
def synth_identities_cmd(
    scans: Annotated[Path, typer.Argument(help="A synth-scans folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for <subject>.safetensors (render-dataset's "
                                      "--identities).")],
    backend: Annotated[str, typer.Option(help="dlib (the recogniser on portraits of each subject), arcface, or "
                                         "synthetic (the shape code projected to 128 values).")] = "dlib",
    preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """ID embeddings of synthetic subjects; with a recogniser, also how well it tells them apart."""
    from idto3d.core.config import load_config
    from idto3d.core.progress import progress_bar
    from idto3d.stages.synth_scans import shape_codes
    from idto3d.stages.synth_identity import synth_identities

    cfg = load_config(preset, config, set_)
    with progress_bar("synth-identities", total=len(shape_codes(scans)), console=console) as update:
        sep = synth_identities(scans, out, cfg, backend=backend, update=update)
    if sep is not None:
        verdict = "separates the subjects" if sep.separates else "does NOT separate the subjects cleanly"
        console.print(f"{backend}: views to own subject {sep.within:.3f} (max {sep.within_max:.3f}), between subjects "
                      f"{sep.between:.3f} (min {sep.between_min:.3f}), nearest subject correct "
                      f"{sep.nearest_correct:.0%}: {verdict} -> {out / 'separation.json'}", highlight=False)
    else:
        console.print(f"{backend} identities -> {out}")


@app.command("make-base")
@user_errors
def make_base_cmd(
    out: Annotated[Path, typer.Argument(help="Folder for the diffusers base model (prior.base_model).")],
    size: Annotated[str, typer.Option(help="tiny (~1M UNet) or miniature (~4.4M UNet).")] = "miniature",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Write an SD1.5-architecture base model with random weights, built from config (no download): the base
    of the miniature experiment and of tests."""
    from idto3d.priors.tiny import BASE_SIZES, make_tiny_base_model

    if size not in BASE_SIZES:
        raise IdtoError(f"unknown --size {size!r}; choose one of {', '.join(BASE_SIZES)}")
    console.print(f"{size} base model -> {make_tiny_base_model(out, seed=seed, size=size)}")


@app.command("train-prior")
@user_errors
def train_prior_cmd(
    domain: Annotated[str, typer.Argument(help="Which prior: normal (geometry) or albedo (texture).")],
    data: Annotated[Path, typer.Option("--data", help="Folder made by 'idto3d render-dataset'.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Prior folder to write (checkpoints, logs, weights).")],
    base_model: Annotated[str | None, typer.Option("--base-model", help="SD1.5-architecture diffusers folder or "
                                                   "hub id (default: prior.base_model).")] = None,
    init: Annotated[Path | None, typer.Option("--init", help="Start from this saved prior's adapters "
                                              "(e.g. the first fine-tuning stage).")] = None,
    ip_adapter: Annotated[Path | None, typer.Option("--ip-adapter", help="Initialise the ID branch from an "
                                                    "ip-adapter-faceid_sd15 checkpoint.")] = None,
    preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last "
                                         "checkpoint.")] = False,
) -> None:
    """Fine-tune a prior on rendered scans (L_simple, paper eq. 5; hyper-parameters in prior.train).

    Runs on a CPU, a GPU, or many GPUs with `accelerate launch -m idto3d.cli train-prior ...`.
    """
    from idto3d.core.config import load_config
    from idto3d.priors.training.train import train_prior

    cfg = load_config(preset, config, set_)
    report = train_prior(domain, data, out, cfg, base_model=base_model, init=init, ip_adapter=ip_adapter,
                         resume=resume, console=console)
    loss = "n/a" if report.final_loss is None else f"{report.final_loss:.4g}"
    console.print(f"trained steps {report.start_step}..{report.steps} on {report.samples} images "
                  f"({report.trainable_parameters} trainable parameters), final loss {loss}, "
                  f"{report.seconds:.1f} s -> {out}")


@app.command("sample-prior")
@user_errors
def sample_prior_cmd(
    prior_path: Annotated[str, typer.Argument(metavar="PRIOR", help="Prior folder (train-prior/make-prior) or hub id.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Grid image to write (.png).")],
    identity: Annotated[list[Path] | None, typer.Option("--identity", help="Identity file (repeatable): one row "
                                                         "each; none = no ID tokens.")] = None,
    expression: Annotated[list[str] | None, typer.Option("--expression", help="Expression (repeatable): one "
                                                         "column each.")] = None,
    view: Annotated[list[str] | None, typer.Option("--view", help="View word of the prompt (repeatable: front, "
                                                   "side, back); rows per identity.")] = None,
    prompt: Annotated[str, typer.Option(help="Prompt template; {view} and {what} are filled in.")] =
        "A {view} view {what} face portrait of a young synthetic person on a white background",
    steps: Annotated[int, typer.Option(help="DDIM steps.")] = 25,
    cfg_scale: Annotated[float, typer.Option("--cfg", help="Classifier-free guidance scale.")] = 3.0,
    lambda_id: Annotated[float, typer.Option(help="Weight of the ID branch (0 = off).")] = 1.0,
    id_guidance: Annotated[float, typer.Option(help="ID-only guidance scale (prior.guidance.id_guidance_scale; "
                                               "0 = off).")] = 0.0,
    exp_guidance: Annotated[float, typer.Option(help="Expression-only guidance scale "
                                                "(prior.guidance.exp_guidance_scale; 0 = off).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the initial noise.")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when present).")] = None,
) -> None:
    """DDIM samples of a prior (normal maps, or albedo for an albedo prior) for identities x views x
    expressions, as one grid image (rows: identity, view; columns: expression)."""
    from idto3d.identity.io import load_identity
    from idto3d.priors.prior import load_prior
    from idto3d.priors.sampling import SampleSpec, ddim_samples, image_grid
    from idto3d.render.preview import save_png

    if steps < 1 or out.suffix.lower() != ".png":
        raise IdtoError("--steps must be >= 1 and --out a .png file")
    prior = load_prior(prior_path, device=device)
    what = {"normal": "normal map", "albedo": "albedo"}.get(prior.spec.domain, prior.spec.domain)
    ids = [load_identity(p).embedding for p in identity] if identity else [None]
    exps = list(expression) if expression else ["neutral"]
    specs = [SampleSpec(prompt.format(view=v, what=what), i, e) for i in ids for v in (view or ["front"])
             for e in exps]
    images = ddim_samples(prior, specs, steps=steps, guidance_scale=cfg_scale, lambda_id=lambda_id,
                          id_guidance_scale=id_guidance, exp_guidance_scale=exp_guidance, seed=seed)
    save_png(image_grid(images, len(exps)), out)
    console.print(f"{len(specs)} samples ({len(ids)} identities x {len(view or ['front'])} views x {len(exps)} "
                  f"expressions) -> {out}")


@app.command("make-prior")
@user_errors
def make_prior_cmd(
    domain: Annotated[str, typer.Argument(help="Which prior: normal (geometry) or albedo (texture).")],
    base_model: Annotated[str, typer.Option("--base-model", help="SD1.5-architecture diffusers folder, or a hub id "
                                            "already in the Hugging Face cache.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Prior folder to write.", show_default=False)],
    vae: Annotated[str | None, typer.Option("--vae", help="Separate VAE folder or hub id (for \"noVAE\" base "
                                            "models, e.g. stabilityai/sd-vae-ft-mse).")] = None,
    ip_adapter: Annotated[Path | None, typer.Option("--ip-adapter", help="IP-Adapter FaceID checkpoint "
                                                    "(ip-adapter-faceid_sd15.bin, or -plus / -plusv2) for the ID "
                                                    "branch.")] = None,
    image_encoder: Annotated[str | None, typer.Option("--image-encoder", help="CLIP ViT-H-14 image encoder "
                                                      "(folder or cached hub id) that FaceID Plus checkpoints "
                                                      "read the face with.")] = None,
    conventions: Annotated[str | None, typer.Option("--conventions", help="Prompts / background / CFG preset: "
                                                    "humannorm-normal, faceid-albedo, idto3d-normal, idto3d-albedo "
                                                    "(default: humannorm-normal for normal, faceid-albedo for "
                                                    "albedo).")] = None,
    fuse_lora: Annotated[bool, typer.Option("--fuse-lora", help="Add FaceID's own LoRA (trained with its ID "
                                            "K/V) into the frozen UNet.")] = False,
    recogniser: Annotated[Path | None, typer.Option("--recogniser", help="The recogniser ONNX the ID branch "
                                                    "expects (recorded with its hash; default with --ip-adapter: "
                                                    "w600k_r50.onnx by name).")] = None,
    id_dim: Annotated[int | None, typer.Option("--id-dim", help="ID embedding size without --ip-adapter "
                                               "(512 ArcFace, 128 dlib; default 512).")] = None,
    uncond_id: Annotated[str | None, typer.Option("--uncond-id", help="CFG's unconditional ID branch: off, or "
                                                  "zero (FaceID's projected zero embedding); default: the "
                                                  "conventions'.")] = None,
) -> None:
    """Make a prior folder from public weights, with no training (see README "Weights")."""
    from idto3d.priors.make_prior import make_prior

    made = make_prior(domain, base_model, out, vae=vae, ip_adapter=ip_adapter, conventions=conventions,
                      fuse_lora=fuse_lora, recogniser=recogniser, id_dim=id_dim, uncond_id=uncond_id,
                      image_encoder=image_encoder)
    faceid = "" if made.ip_adapter is None else (f", ID branch from {made.ip_adapter['file']} "
                                                 f"({made.ip_adapter['kind']}, LoRA {made.ip_adapter['lora']})")
    console.print(f"{domain} prior on {made.base_model}{f' + VAE {made.vae}' if made.vae else ''}, conventions "
                  f"{made.conventions}, {made.id_dim}-D IDs{faceid} -> {made.out}", highlight=False)


@app.command("identity")
@user_errors
def identity_cmd(
    photos: Annotated[list[Path], typer.Argument(help="1-5 photos of one person: files and/or folders.",
                                                 show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Identity file to write (.safetensors).",
                                      show_default=False)],
    backend: Annotated[str | None, typer.Option(help="dlib (128-D, offline default) or arcface (512-D, the "
                                                "paper's; needs --pack).")] = None,
    pack: Annotated[Path | None, typer.Option(help="insightface model pack folder (e.g. buffalo_l with "
                                              "det_10g.onnx + w600k_r50.onnx); implies --backend arcface.")] = None,
    face_index: Annotated[int | None, typer.Option("--face-index", help="Face to use in each photo, by size "
                                                   "(0 = largest).")] = None,
    drop_outliers: Annotated[bool, typer.Option("--drop-outliers", help="Leave photos that look like someone "
                                                "else out of the mean.")] = False,
    crops: Annotated[Path | None, typer.Option(help="Folder for the aligned crops the model saw "
                                               "(default: <out stem>_crops/ beside the output).")] = None,
    preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """Photos -> face crops -> one identity embedding (mean of per-photo embeddings), with quality flags."""
    from rich.table import Table

    from idto3d.core.config import config_from_dict, config_to_dict, load_config
    from idto3d.identity.extract import compute_identity

    if out.suffix.lower() != ".safetensors":
        raise IdtoError(f"--out must end in .safetensors, got {out}")
    data = config_to_dict(load_config(preset, config, set_))
    ident_cfg = data["identity"]
    if pack is not None:
        ident_cfg["insightface_pack"] = str(pack)
        ident_cfg["backend"] = "arcface" if backend is None else backend
    elif backend is not None:
        ident_cfg["backend"] = backend
    if face_index is not None:
        ident_cfg["face_index"] = face_index
    if drop_outliers:
        ident_cfg["drop_outliers"] = True
    cfg = config_from_dict(data)
    ident = compute_identity(photos, out, cfg.identity, crops_dir=crops, console=console)

    table = Table(title=f"identity: {ident.backend} {ident.dim}-D, {int(ident.used.sum())}/{ident.n_photos} "
                        "photos used")
    for col in ("#", "photo", "faces", "chosen", "quality", "dist to mean", "dist to others", "used"):
        table.add_column(col, justify="right" if col in ("#", "faces", "chosen") or col.startswith("dist") else "left")
    for i, p in enumerate(ident.photos):
        loo = "-" if p["loo_distance"] is None else f"{p['loo_distance']:.3f}"
        style = "green" if p["quality"] == "ok" else "yellow"
        table.add_row(str(i), Path(p["path"]).name, str(p["n_faces"]), str(p["face_index"]),
                      f"[{style}]{p['quality']}[/]", f"{p['distance_to_mean']:.3f}", loo,
                      "yes" if p["used"] else "[red]no[/]")
    Console().print(table)
    crop_dirs = sorted({str(Path(p["crop"]).parent) for p in ident.photos if p.get("crop")})
    where = f" (crops: {', '.join(str(out.parent / d) for d in crop_dirs)})" if crop_dirs else ""
    console.print(f"wrote {out}{where}", highlight=False)


@app.command("generate")
@user_errors
def generate_cmd(
    inputs: Annotated[list[Path], typer.Argument(help="1-5 photos of one person (files/folders), or one identity "
                                                 ".safetensors file.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (re-running the same command resumes it).",
                                      show_default=False)],
    normal_prior: Annotated[str | None, typer.Option("--normal-prior", help="Normal prior folder or hub id "
                                                     "(default: prior.normal).")] = None,
    albedo_prior: Annotated[str | None, typer.Option("--albedo-prior", help="Albedo prior folder or hub id "
                                                     "(default: prior.albedo).")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="Subject text of the prompts, e.g. \"a young "
                                               "woman\" (default: \"a person\").")] = None,
    expressions: Annotated[str | None, typer.Option("--expressions", help="Comma-separated expressions, e.g. "
                                                    "neutral,smile,mouth_open (default: the config's; without "
                                                    "priors, neutral plus the face model's expressions).")] = None,
    envmaps: Annotated[Path | None, typer.Option("--envmaps", help="Folder of .hdr/.exr environment maps for "
                                                 "the texture stage (default: procedural skies).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="Where the stages run: auto, cpu, cuda or "
                                                                "mps (runtime.device; auto = cuda when present).")] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="The priors' dtype: auto, fp32, fp16 or bf16 "
                                                                      "(runtime.precision).")] = None,
    preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Start over in a run folder made with another config.")] = False,
) -> None:
    """Photos -> identity -> template fit -> geometry SDS -> texture SDS -> GLB/OBJ + PBR maps and turntables."""
    from idto3d.stages.generate import generate
    from idto3d.stages.generate_config import generate_config

    cfg = generate_config(preset, config, set_, expressions=expressions, device=device, precision=precision,
                          envmaps=envmaps, priors=(normal_prior, albedo_prior))
    result = generate(inputs, out, cfg, normal_prior=normal_prior, albedo_prior=albedo_prior, prompt=prompt,
                      overwrite=overwrite, console=console)
    _print_generate_summary(result, cfg, out)


def _print_generate_summary(result: GenerateResult, cfg: Config, out: Path) -> None:
    """What ``generate`` did, for the user."""
    from idto3d.core.run_layout import RunLayout

    if result.geometry is not None and result.geometry.iterations >= cfg.geometry.iterations:
        geo = result.geometry
        console.print(f"geometry: {geo.iterations} iterations ({geo.skipped_steps} skipped), {geo.seconds:.1f} s",
                      highlight=False)
    if result.texture is not None and result.texture.iterations >= cfg.texture.iterations:
        tex = result.texture
        console.print(f"texture: {tex.iterations} iterations ({tex.skipped_steps} skipped), {tex.seconds:.1f} s",
                      highlight=False)
    if result.exported:
        layout = RunLayout(out)
        glbs = sum(p.suffix == ".glb" and p.parent.name != layout.morph_glb.parent.name for p in result.exported)
        morph = (f" (and {layout.morph_glb}: the expressions as morph targets)"
                 if any(p.name == layout.morph_glb.name for p in result.exported) else "")
        console.print(f"wrote {glbs} GLB heads and {len(result.exported) - glbs} more files to {layout.export} "
                      f"and {layout.renders}{morph}", highlight=False)
    if result.missing:
        console.print(f"[yellow]{'note' if result.exported else 'stopped'}:[/] {result.missing}", highlight=False)


@app.command("evaluate")
@user_errors
def evaluate_cmd(
    runs: Annotated[list[Path], typer.Argument(help="Run folder(s) made by 'idto3d generate'; several are "
                                               "compared side by side.", show_default=False)],
    references: Annotated[list[Path], typer.Option("--references", "-r", help="Reference photos of the person "
                                                   "(files or folders; repeat the option, or quote a glob).",
                                                   show_default=False)],
    elevations: Annotated[int, typer.Option(help="Camera elevations in [-15, +15] degrees.")] = 3,
    azimuths: Annotated[int, typer.Option(help="Camera azimuths in [-65, +65] degrees.")] = 7,
    resolution: Annotated[int, typer.Option(help="Render size in pixels (square).")] = 256,
    fid_images: Annotated[Path | None, typer.Option("--fid-images", help="Folder of reference images for the "
                                                    "texture FID (needs --inception).")] = None,
    fid_normals: Annotated[Path | None, typer.Option("--fid-normals", help="Folder of reference normal maps for "
                                                     "the geometry FID (needs --inception).")] = None,
    inception: Annotated[Path | None, typer.Option("--inception", help="FID feature network (.onnx, see the "
                                                   "README's FID section).")] = None,
    preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """Identity similarity of the exported heads over the paper's camera grid, t-SNE, FID -> RUN/report/."""
    import glob

    from rich.table import Table

    from idto3d.core.config import load_config
    from idto3d.evaluate.run import evaluate_runs
    from idto3d.evaluate.views import camera_grid

    cfg = load_config(preset, config, set_)
    refs: list[Path] = []
    for r in references:  # a quoted glob ('refs/*.jpg') is expanded here; unquoted, the shell did it
        matches = sorted(Path(p) for p in glob.glob(str(r))) if glob.has_magic(str(r)) and not r.exists() else []
        refs += matches or [r]
    from idto3d.stages.run_folder import hold_runs

    with hold_runs(runs):
        result = evaluate_runs(runs, refs, cfg, grid=camera_grid(elevations, azimuths), resolution=resolution,
                               fid_images=fid_images, fid_normals=fid_normals, inception=inception,
                               console=console)
    first = result["runs"][0]
    table = Table(title=f"identity similarity ({first['backend']}, {len(first['references'])} reference photo(s), "
                        f"{first['grid']['views']} views per expression)")
    cols = ["run", "mean cosine", "std", "mean distance", f"same person (<{first['identity']['threshold']:g})",
            "faces missed"]
    with_fid = any(m["fid"]["texture"] is not None or m["fid"]["geometry"] is not None for m in result["runs"])
    cols += ["FID texture", "FID geometry"] if with_fid else []
    for col in cols:
        table.add_column(col, justify="left" if col == "run" else "right")

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    for m in result["runs"]:
        ident = m["identity"]
        rate = "-" if ident["same_person_rate"] is None else f"{ident['same_person_rate'] * 100:.0f}%"
        row = [m["name"], num(ident["cosine"]["mean"]), num(ident["cosine"]["std"]), num(ident["distance"]["mean"]),
               rate, f"{ident['faces_missed']}/{ident['renders']}"]
        if with_fid:
            row += [num(m["fid"]["texture"]), num(m["fid"]["geometry"])]
        table.add_row(*row)
    Console().print(table)
    for m, report in zip(result["runs"], result["reports"]):
        where = report if report is not None else Path(m["run"]) / m["files"]["metrics"]
        console.print(f"{m['name']}: report -> {where}", highlight=False)


@app.command("view")
@user_errors
def view_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder made by 'idto3d generate'.", show_default=False)],
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: any free port).")] = 0,
    no_open: Annotated[bool, typer.Option("--no-open", help="Do not open a browser.")] = False,
) -> None:
    """Serve RUN/report/index.html (written first if missing) and its 3D viewer on localhost until Ctrl-C."""
    import webbrowser

    from idto3d.evaluate.report import ensure_report, serve

    ensure_report(run, console=console)
    server, url = serve(run, port)
    typer.echo(url)
    console.print("serving the report on localhost only; Ctrl-C to stop", highlight=False)
    if not no_open:
        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
