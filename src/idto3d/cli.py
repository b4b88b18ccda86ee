"""The ``idto3d`` command line: each command is a thin wrapper over a library function."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from idto3d import __version__
from idto3d.errors import IdtoError

app = typer.Typer(name="idto3d", no_args_is_help=True, add_completion=False,
                  help="ID-to-3D: expressive, relightable 3D heads from 1-5 photos via score distillation.")
bench_app = typer.Typer(no_args_is_help=True, help="Time the pipeline's stages on this machine.")
app.add_typer(bench_app, name="bench")

console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

PresetOpt = Annotated[str | None, typer.Option("--preset", "-p", help="Base preset: preview or paper.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML file overriding preset keys.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override one key: section.key=value "
                                                  "(repeatable).")]


def user_errors(fn: F) -> F:
    """Show user-caused errors as one clear line (exit 2) instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except IdtoError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(code=2) from None

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
    from idto3d.config import dump_config, load_config

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
    from idto3d.pipeline.init_geometry import run_template_fit

    report = run_template_fit(out, preset=preset, config_file=config, overrides=set_, console=console,
                              overwrite=overwrite)
    empty = [i for i, c in enumerate(report.chamfer) if c == float("inf")]
    if empty:
        console.print(f"[yellow]warning:[/] expression(s) {empty} have no surface yet; "
                      "raise template.iterations (the preview preset uses 400)")
    rel = ", ".join(f"{r * 100:.3f}%" for r in report.chamfer_relative)
    console.print(f"Chamfer to template / bbox diagonal: {rel}  ({report.seconds:.1f} s) -> {out}")


@bench_app.command("render")
@user_errors
def bench_render_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON instead of a table.")] = False,
    repeats: Annotated[int, typer.Option(help="Timed repetitions per case (median reported).")] = 5,
    quick: Annotated[bool, typer.Option(help="Small sizes only (smoke test).")] = False,
) -> None:
    """Rasterise + normal shading (fwd+bwd) at ~20k/~80k triangles x 256/512, and marching tets + field."""
    from idto3d.bench import bench_render, render_table

    if repeats <= 0:
        raise IdtoError("--repeats must be > 0")
    rows = bench_render(repeats=repeats, quick=quick)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        Console().print(render_table(rows))


if __name__ == "__main__":  # pragma: no cover
    app()
