"""``idto3d batch MANIFEST --out runs/``: many identities, one Ray task each (``idto3d.batch``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from idto3d.cli.app import ConfigOpt, PresetOpt, SetOpt, app, console, user_errors
from idto3d.core.errors import IdtoError


@app.command("batch")
@user_errors
def batch_cmd(
    manifest: Annotated[Path, typer.Argument(help="CSV or YAML: one identity per row (name, photos or identity, "
                                             "prompt, expressions, preset, set).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the runs (OUT/<name>/), batch.json and "
                                      "batch.html; on storage every Ray node sees.", show_default=False)],
    address: Annotated[str | None, typer.Option("--address", help="Ray cluster to join: auto, or "
                                                "ray://host:port (default: a local Ray on this machine).")] = None,
    cpus_per_run: Annotated[float, typer.Option("--cpus-per-run", help="CPUs each identity holds (also its "
                                                "torch threads).")] = 1.0,
    gpus_per_run: Annotated[float, typer.Option("--gpus-per-run", help="GPUs each identity holds (0 = CPU "
                                                "runs; a node with 8 GPUs runs 8 identities at once).")] = 0.0,
    resources: Annotated[list[str] | None, typer.Option("--resources", help="Custom Ray resource each identity "
                                                        "holds: NAME=AMOUNT (repeatable).")] = None,
    max_retries: Annotated[int, typer.Option("--max-retries", help="Restarts of an identity whose worker "
                                             "died; each restart resumes its run folder.")] = 3,
    normal_prior: Annotated[str | None, typer.Option("--normal-prior", help="Normal prior for every row.")] = None,
    albedo_prior: Annotated[str | None, typer.Option("--albedo-prior", help="Albedo prior for every row.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or mps (runtime.device).")] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="auto, fp32, fp16 or bf16.")] = None,
    evaluate: Annotated[bool, typer.Option("--evaluate", help="Also evaluate each run against its own photos "
                                           "(`idto3d evaluate RUN -r PHOTOS`, default camera grid): the batch "
                                           "page then shows each identity distance.")] = False,
    preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """Generate every identity of MANIFEST (each row is one `generate` run, in OUT/<name>/) on Ray.

    The whole manifest is checked before any compute; re-running the same command skips finished identities
    and resumes unfinished ones. Exit status 1 when any identity failed.
    """
    from idto3d.batch.engine import BatchSettings, parse_resources, require_ray, run_batch
    from idto3d.batch.manifest import BatchOptions, read_manifest

    require_ray()
    settings = BatchSettings(address, cpus_per_run, gpus_per_run, parse_resources(resources), max_retries)
    settings.check()
    opts = BatchOptions(preset, config, tuple(set_ or ()), device, precision, normal_prior, albedo_prior,
                        evaluate)
    checked = read_manifest(manifest, opts)
    if checked.problems:
        from rich.table import Table

        table = Table(title=f"{manifest}: {len(checked.problems)} bad row(s)")
        for col in ("row", "name", "problem"):
            table.add_column(col)
        for p in checked.problems:
            table.add_row(p.where, p.name or "-", p.message)
        console.print(table)
        raise IdtoError(f"{len(checked.problems)} bad row(s) in {manifest} (listed above); nothing was run")
    records = run_batch(checked.rows, out, settings, opts, console=console, manifest=manifest)
    failed = [r for r in records if r.status == "failed"]
    console.print(f"batch: {len(records) - len(failed)} done, {len(failed)} failed of {len(records)} -> "
                  f"{out / 'batch.html'}", highlight=False)
    if failed:
        raise typer.Exit(code=1)
