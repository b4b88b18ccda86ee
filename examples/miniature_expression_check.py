"""How far does each expression's mesh travel from the subject's neutral truth toward its own expression's truth?
(README "Miniature experiment", run 10.)

The metrics' own-expression test (is a mouth_open mesh closer, in Chamfer, to the mouth_open truth than to the
neutral one?) passes or fails; this says by how much, in the space SDS works in: normal maps from the config's
cameras (``render.camera``; pass the run's face-centred ``--set``s) at the guidance's latent size. For a run's mesh
r of expression E and the subject's truths n (neutral) and e (E), all rendered from the same cameras:

- ``progress`` p = <r - n, e - n> / |e - n|^2: 0 at the neutral truth, 1 at E's. Here "closer to its own
  expression" is p > 0.5 for E's mesh and p < 0.5 for the neutral mesh (measured against E's truth too),
- ``off``: |r - n - p (e - n)| / |e - n|, the distance from the line through both truths, in gaps,
- ``start``: p of the run's start mesh (``geometry/init_<E>.ply``), so ``progress - start`` is what SDS did.

Usage:

    python examples/miniature_expression_check.py WORK [RUN ...] [--expression mouth_open] [--set k=v ...]

RUN defaults to every WORK/runs/VARIANT/SUBJECT; prints one JSON row per run and expression mesh, then one mean
row per variant (the variant is RUN's parent folder's name).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from idto3d.core.config import load_config
from idto3d.core.expressions import EXPRESSION_NAMES
from idto3d.geometry.mesh_io import load_mesh
from idto3d.priors.guidance import downsample_latents
from idto3d.render.camera import sample_orbit_cameras
from idto3d.stages.geometry_stage import render_for_guidance


def progress(r: torch.Tensor, n: torch.Tensor, e: torch.Tensor) -> tuple[float, float]:
    """``(p, off)`` of r against the segment from n (p = 0) to e (p = 1), over all views at once."""
    gap, rel = (e - n).flatten().double(), (r - n).flatten().double()
    p = float(rel @ gap / (gap @ gap))
    return p, float((rel - p * gap).norm() / gap.norm())


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("runs", type=Path, nargs="*")
    ap.add_argument("--expression", default="mouth_open", help="the expression compared with neutral")
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    if args.expression not in EXPRESSION_NAMES or args.expression == "neutral":
        raise SystemExit(f"error: --expression {args.expression}: not an expression other than neutral")
    cfg = load_config("miniature", overrides=args.overrides)
    from miniature_oracle import subject_scans  # the examples folder is on sys.path when run as a script

    runs = args.runs or sorted(p for p in (args.work / "runs").glob("*/[0-9][0-9][0-9]") if p.is_dir())
    cam = cfg.render.camera
    cams = sample_orbit_cameras(args.views, cam.elevation_deg, cam.azimuth_deg, cam.radius, cam.fov_deg,
                                generator=torch.Generator().manual_seed(cfg.seed), target=cam.target)

    def latents(mesh) -> torch.Tensor:
        return downsample_latents(render_for_guidance(mesh, cams, cfg.render.resolution), cfg.prior.guidance.latent_size)

    truths: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    rows, by_variant = [], defaultdict(list)
    for run in runs:
        subject, geo = run.name, run / "geometry"
        if subject not in truths:
            truths[subject] = tuple(latents(m) for m in subject_scans(args.work, subject, ["neutral", args.expression]))
        n, e = truths[subject]
        for name in ("neutral", args.expression):
            if not (geo / f"{name}.ply").is_file():
                raise SystemExit(f"error: {geo / name}.ply: no such mesh (has the run finished?)")
            p, off = progress(latents(load_mesh(geo / f"{name}.ply")), n, e)
            start = (progress(latents(load_mesh(geo / f"init_{name}.ply")), n, e)[0]
                     if (geo / f"init_{name}.ply").is_file() else None)
            own = p > 0.5 if name != "neutral" else p < 0.5
            row = {"run": str(run), "variant": run.parent.name, "subject": subject, "mesh": name,
                   "progress": p, "off": off, "start": start, "closer_to_own": own}
            print(json.dumps(row))
            rows.append(row)
            by_variant[(run.parent.name, name)].append(row)
    for (variant, name), rs in by_variant.items():
        mean = {"variant": variant, "mesh": name, "runs": len(rs),
                "progress": sum(r["progress"] for r in rs) / len(rs), "off": sum(r["off"] for r in rs) / len(rs),
                "closer_to_own": sum(r["closer_to_own"] for r in rs) / len(rs)}
        print(json.dumps(mean))
        rows.append(mean)
    return rows


if __name__ == "__main__":
    main()
