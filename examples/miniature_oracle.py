"""The miniature experiment's control run (README "Miniature experiment"): the same geometry SDS as
`generate` (miniature preset, generic template start, the experiment's overrides), but guided by the *oracle*,
the exact score of the subject's own ground-truth scans (priors/mesh_oracle.py) instead of the learned prior.
It separates the pipeline (renders, latents, timestep schedule, lr, Laplacian, iterations) from the prior: if
this run does not recover the subject, no prior could through that schedule. Usage:

    python examples/miniature_oracle.py WORK SUBJECT [--variant oracle] [--set key=value ...]

SUBJECT is a folder name under WORK/scans or WORK/heldout (e.g. 006); the run goes to WORK/runs/VARIANT/SUBJECT
(geometry/<expression>.ply + init_<expression>.ply), where examples/miniature_metrics.py measures it like the
prior's runs. Expressions, iterations and schedule come from --set (default: neutral,mouth_open; 60 iterations).
Resumable as every stage is (re-run the same command).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from idto3d.core.config import load_config
from idto3d.core.device import resolve_device
from idto3d.core.expressions import EXPRESSION_NAMES
from idto3d.geometry.mesh_io import load_mesh
from idto3d.priors.mesh_oracle import MeshOracleGuidance
from idto3d.stages.geometry_stage import geometry_schedule, run_geometry_stage
from idto3d.stages.initial_geometry import ensure_init
from idto3d.stages.run_folder import prepare_run

# What examples/miniature_experiment.sh passes to `generate` (the texture keys do not matter here).
EXPERIMENT = ["face_model.enabled=false", "expressions=[neutral, mouth_open]", "geometry.iterations=60"]


def subject_scans(work: Path, subject: str, expressions: list[str]) -> list:
    folder = next((r / subject for r in (work / "scans", work / "heldout") if (r / subject).is_dir()), None)
    if folder is None:
        raise SystemExit(f"error: no subject {subject} under {work}/scans or {work}/heldout")
    return [load_mesh(folder / f"{EXPRESSION_NAMES.index(e):03d}" / "scan.ply") for e in expressions]


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("subject")
    ap.add_argument("--variant", default="oracle")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    cfg = load_config("miniature", overrides=EXPERIMENT + args.overrides)
    targets = subject_scans(args.work, args.subject, list(cfg.expressions))
    run = args.work / "runs" / args.variant / args.subject
    device = resolve_device(cfg.runtime.device)
    guidance = MeshOracleGuidance(targets, cfg.render.resolution, cfg.prior.guidance, geometry_schedule(cfg.geometry),
                                  total_steps=cfg.geometry.iterations, seed=cfg.seed)
    prepare_run(run, cfg)
    field = ensure_init(run, cfg, progress=True, device=device)
    run_geometry_stage(run, cfg, guidance, field, progress=True)
    return run


if __name__ == "__main__":
    print(main())
