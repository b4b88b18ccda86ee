"""``idto3d bench ...``: the timing harnesses as a sub-app (tables by default, ``--json`` for machines)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from idto3d.cli.app import PresetOpt, SetOpt, app, user_errors
from idto3d.core.errors import IdtoError

bench_app = typer.Typer(no_args_is_help=True, help="Time the pipeline's stages on this machine.")
app.add_typer(bench_app, name="bench")


def _check_repeats(repeats: int) -> None:
    if repeats <= 0:
        raise IdtoError("--repeats must be > 0")


def _print_rows(rows: list[dict], as_json: bool) -> None:
    from idto3d.bench.timing import render_table

    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        Console().print(render_table(rows))


@bench_app.command("render")
@user_errors
def bench_render_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON instead of a table.")] = False,
    repeats: Annotated[int, typer.Option(help="Timed repetitions per case (median reported).")] = 5,
    quick: Annotated[bool, typer.Option(help="Small sizes only (smoke test).")] = False,
) -> None:
    """Rasterise + normal shading (fwd+bwd) at ~20k/~80k triangles x 256/512, and marching tets + field."""
    from idto3d.bench.render import bench_render

    _check_repeats(repeats)
    rows = bench_render(repeats=repeats, quick=quick)
    _print_rows(rows, as_json)


@bench_app.command("identity")
@user_errors
def bench_identity_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON instead of a table.")] = False,
    repeats: Annotated[int, typer.Option(help="Timed repetitions per step (median reported).")] = 5,
    pack: Annotated[Path | None, typer.Option(help="Also time the ArcFace path with this insightface pack "
                                              "folder.")] = None,
) -> None:
    """Per-photo CPU ms for detection, alignment and embedding (dlib; ArcFace with --pack), vs PNG decode."""
    from idto3d.bench.identity import bench_identity

    _check_repeats(repeats)
    rows = bench_identity(pack=pack, repeats=repeats)
    _print_rows(rows, as_json)


@bench_app.command("guidance")
@user_errors
def bench_guidance_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON instead of a table.")] = False,
    repeats: Annotated[int, typer.Option(help="Timed repetitions per tiny case (median reported).")] = 5,
    quick: Annotated[bool, typer.Option(help="Skip the full-size SD1.5 UNet (tens of seconds per step).")] = False,
) -> None:
    """One SDS step (fwd+bwd, CFG) with the tiny prior and with a full-size SD1.5 UNet from config."""
    from idto3d.bench.sds_guidance import bench_guidance

    _check_repeats(repeats)
    rows = bench_guidance(repeats=repeats, quick=quick)
    _print_rows(rows, as_json)


@bench_app.command("geometry")
@user_errors
def bench_geometry_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON instead of a table.")] = False,
    repeats: Annotated[int, typer.Option(help="Timed iterations per guidance (median reported).")] = 5,
    quick: Annotated[bool, typer.Option(help="Small grid and render size (smoke test).")] = False,
) -> None:
    """Seconds per geometry SDS iteration on CPU, split into field, render, guidance, backward and step."""
    from idto3d.bench.geometry import bench_geometry

    _check_repeats(repeats)
    rows = bench_geometry(repeats=repeats, quick=quick)
    _print_rows(rows, as_json)


@bench_app.command("texture")
@user_errors
def bench_texture_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON instead of a table.")] = False,
    repeats: Annotated[int, typer.Option(help="Timed iterations per guidance (median reported).")] = 5,
    quick: Annotated[bool, typer.Option(help="Small mesh, texture and render size (smoke test).")] = False,
) -> None:
    """Seconds per texture SDS iteration on CPU, split into field (bake), render/shade, guidance, backward, step."""
    from idto3d.bench.texture import bench_texture

    _check_repeats(repeats)
    _print_rows(bench_texture(repeats=repeats, quick=quick), as_json)


@bench_app.command("generate")
@user_errors
def bench_generate_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON instead of a table.")] = False,
    preset: PresetOpt = None, set_: SetOpt = None,
    baseline: Annotated[bool, typer.Option("--baseline/--no-baseline", help="Also time the DMTet-field offline "
                                           "path the stitched head replaced, in the same call (the ratio's base).")
                        ] = True,
) -> None:
    """Seconds of the whole offline generate on one photo (scikit-image's astronaut), per step and in total."""
    from idto3d.bench.offline_run import bench_generate

    _print_rows(bench_generate(preset or "preview", list(set_ or []), baseline), as_json)


@bench_app.command("pipeline")
@user_errors
def bench_pipeline_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON instead of a table.")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda or mps.")] = "cpu",
    full_size: Annotated[bool, typer.Option("--full-size", help="Also time a full SD1.5-architecture prior "
                                                                "(random weights) at 512 px, VAE latents.")] = False,
    repeats: Annotated[int | None, typer.Option(help="Timed iterations per stage (median; a warm-up first when "
                                                     "> 1). Default: 1 for --full-size on CPU, else 3.")] = None,
    quick: Annotated[bool, typer.Option(help="Small grid, texture and render size (smoke test).")] = False,
    preset: PresetOpt = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override KEY=VALUE (repeatable), e.g. "
                                                                 "runtime.precision=fp16, runtime.compile=true, "
                                                                 "runtime.fast_paths=true.")] = None,
    normal_prior: Annotated[str | None, typer.Option("--normal-prior", help="With --full-size: time the geometry "
                                                     "stage with this prior folder (needs --albedo-prior).")] = None,
    albedo_prior: Annotated[str | None, typer.Option("--albedo-prior", help="With --full-size: time the texture "
                                                     "stage with this prior folder.")] = None,
) -> None:
    """Seconds per geometry and texture SDS iteration on a device, split into parts, with peak memory and
    the projected wall time of the paper preset's schedules."""
    from idto3d.bench.pipeline import bench_pipeline

    if repeats is not None:
        _check_repeats(repeats)
    if (normal_prior is None) != (albedo_prior is None) or (normal_prior and not full_size):
        raise IdtoError("--normal-prior and --albedo-prior go together, with --full-size")
    folders = (normal_prior, albedo_prior) if normal_prior and albedo_prior else None
    _print_rows(bench_pipeline(device=device, full_size=full_size, repeats=repeats, quick=quick,
                               preset=preset or "preview", overrides=list(set_ or []), prior_folders=folders),
                as_json)


@bench_app.command("runtime")
@user_errors
def bench_runtime_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON instead of a table.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "cpu",
    full_size: Annotated[bool, typer.Option("--full-size", help="Also time a full SD1.5-architecture prior "
                                                                "(random weights) at 512 px, 64x64 latents.")] = False,
    repeats: Annotated[int | None, typer.Option(help="Timed calls per variant after one untimed first call "
                                                     "(median). Default: 1 for --full-size on CPU, else 10.")] = None,
    variants: Annotated[str | None, typer.Option(help="Comma-separated variants among fp32, bf16, fp16, "
                                                      "channels_last, math, compile; + joins options "
                                                      "(bf16+channels_last). fp32 always runs: it is the "
                                                      "baseline. Default: all six.")] = None,
) -> None:
    """The prior's runtime options (precision, channels-last, attention kernel, torch.compile): ms of one SDS
    call + backward to the renders for each, with its ratio to fp32 + SDPA and the peak memory."""
    from idto3d.bench.prior_options import bench_runtime

    if repeats is not None:
        _check_repeats(repeats)
    _print_rows(bench_runtime(device=device, full_size=full_size, repeats=repeats, variants=variants), as_json)



@bench_app.command("batch")
@user_errors
def bench_batch_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON instead of a table.")] = False,
    identities: Annotated[int, typer.Option(help="Short identities per case.")] = 4,
    set_: SetOpt = None,
) -> None:
    """`idto3d batch` on a local Ray: the same short identities in-process, on 1 worker and on 2 workers (the
    speed-up ratio), and the overhead Ray adds per identity. Needs the batch extra (Ray)."""
    from idto3d.bench.batch import bench_batch

    if identities < 2:
        raise IdtoError("--identities must be >= 2 (two workers need two identities)")
    _print_rows(bench_batch(identities, list(set_ or [])), as_json)
