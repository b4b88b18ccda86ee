"""Metrics of the miniature experiment (README "Miniature experiment"): Chamfer distances of each held-out
subject's SDS result to its own ground truth, to the starting (generic template) mesh's distance, to every other
subject's ground truth and to its own other expressions. Usage:

    python examples/miniature_metrics.py WORK   # reads WORK/scans, WORK/heldout, WORK/runs/<variant>/<subject>; writes WORK/metrics.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from idto3d.core.expressions import EXPRESSION_NAMES
from idto3d.geometry.mesh_io import load_mesh
from idto3d.geometry.metrics import chamfer_distance


def cd(a, b) -> float:
    return chamfer_distance(a, b, n_samples=5000, generator=torch.Generator().manual_seed(0))


def gt(roots: list[Path], subject: str, expression: str):
    folder = next(r / subject for r in roots if (r / subject).is_dir())
    return load_mesh(folder / f"{EXPRESSION_NAMES.index(expression):03d}" / "scan.ply")


def main(work: Path) -> dict:
    scans = [work / "scans", work / "heldout"]  # train and held-out subjects: all count as "other subjects"
    subjects = sorted(p.name for r in scans for p in r.iterdir() if p.is_dir() and p.name.isdigit())
    rows = []
    for variant_dir in sorted(p for p in (work / "runs").iterdir() if p.is_dir()):
        for run in sorted(p for p in variant_dir.iterdir() if p.is_dir()):
            s = run.name
            for res in sorted((run / "geometry").glob("*.ply")):
                e = res.stem
                if e.startswith("init_") or e not in EXPRESSION_NAMES:
                    continue
                mesh, own = load_mesh(res), gt(scans, s, e)
                start = load_mesh(run / "geometry" / f"init_{e}.ply")
                others = {t: cd(mesh, gt(scans, t, e)) for t in subjects if t != s}
                exprs = {f.stem: cd(mesh, gt(scans, s, f.stem)) for f in (run / "geometry").glob("*.ply")
                         if f.stem != e and f.stem in EXPRESSION_NAMES}
                d_own, d_start = cd(mesh, own), cd(start, own)
                rows.append({"variant": variant_dir.name, "subject": s, "expression": e, "own": d_own,
                             "start": d_start, "gain": 1 - d_own / d_start, "others": others,
                             "nearest_other": min(others.values()) if others else None,
                             "own_other_expressions": exprs,
                             "closer_than_others": bool(others) and d_own < min(others.values()),
                             "closer_than_other_expressions": bool(exprs) and d_own < min(exprs.values())})
    summary = {}
    for v in sorted({r["variant"] for r in rows}):
        rs = [r for r in rows if r["variant"] == v]
        summary[v] = {"mean_gain": sum(r["gain"] for r in rs) / len(rs),
                      "closer_than_others": sum(r["closer_than_others"] for r in rs) / len(rs),
                      "closer_than_other_expressions": sum(r["closer_than_other_expressions"] for r in rs) / len(rs),
                      "rows": len(rs)}
    out = {"summary": summary, "rows": rows}
    (work / "metrics.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))["summary"], indent=1))
