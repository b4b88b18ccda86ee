"""Metrics of the miniature experiment (README "Miniature experiment"): Chamfer distances of each held-out
subject's SDS result to its own ground truth, to the starting (generic template) mesh's distance, to every other
subject's ground truth and to its own other expressions, over the whole head and over the face region. Usage:

    python examples/miniature_metrics.py WORK   # reads WORK/scans, WORK/heldout, WORK/runs/<variant>/<subject>; writes WORK/metrics.json

A variant folder named ``<variant>.s<k>`` holds the same SDS run under seed ``k`` (``<variant>`` itself is the
config's seed, 0): the summary gives each seed's row and, under ``seeds``, their mean and range. Each row is kept in
WORK/metrics_cache under a key of everything that makes it (the meshes' bytes, every ground-truth scan, the face
box and the sampling), so adding a variant re-measures only that variant.

The synthetic subjects differ from the template only where the face model was merged in, so a whole-head Chamfer
is dominated by the (identical) skull, neck and ears. The **face region** is the box around the ground-truth
vertices that differ most between scans (all subjects and expressions share the template's vertices: those moving
by more than ``FACE_FRACTION`` of the largest move), padded by ``FACE_MARGIN``; the face Chamfer averages only the surface samples inside that box, each measured to the other
surface as a whole (so cutting the surface at the box adds no distance).
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from idto3d.core.atomic import atomic_write_text
from idto3d.core.digest import file_sha256
from idto3d.core.expressions import EXPRESSION_NAMES
from idto3d.core.run_manifest import json_digest
from idto3d.geometry.mesh_io import load_mesh
from idto3d.geometry.metrics import SurfaceIndex, chamfer_distance, sample_surface, surface_distances
from idto3d.render.mesh import Mesh

N_SAMPLES = 5000
FACE_MARGIN = 0.02   # working units (0.01 = 2 mm): the box reaches a little past the outermost moved vertex
# A vertex that moves between scans by more than this fraction of the largest move belongs to the face: the
# merge's border falloff moves most of the head's front a little (19.5k of 44k template vertices by > 1e-6).
FACE_FRACTION = 0.25


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def cd(a: Mesh | SurfaceIndex, b: Mesh | SurfaceIndex) -> float:
    return chamfer_distance(a, b, n_samples=N_SAMPLES, generator=_gen())


def face_box(scans: Sequence[Mesh], margin: float = FACE_MARGIN) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` corners of the box around the vertices that differ between ``scans`` (same vertex count)."""
    v = torch.stack([m.vertices.double() for m in scans])  # [S, V, 3]
    move = (v - v[:1]).abs().amax(dim=(0, 2))
    if float(move.max()) <= 0:
        raise ValueError("the scans do not differ anywhere: no face region")
    moved = move > FACE_FRACTION * move.max()
    pts = v[:, moved].reshape(-1, 3)
    return (pts.amin(0) - margin).float(), (pts.amax(0) + margin).float()


def _inside(points: torch.Tensor, box: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return ((points >= box[0]) & (points <= box[1])).all(dim=1)


def region_cd(a: Mesh | SurfaceIndex, b: Mesh | SurfaceIndex, box: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Symmetric Chamfer of the two surfaces' samples inside ``box``, each to the whole other surface."""
    parts = []
    for x, y in ((a, b), (b, a)):
        p = sample_surface(x.mesh if isinstance(x, SurfaceIndex) else x, N_SAMPLES * 4, generator=_gen()).float()
        p = p[_inside(p, box)]
        if len(p) == 0:
            raise ValueError("a surface has no samples in the face region")
        parts.append(surface_distances(p, y).mean())
    return float(0.5 * (parts[0] + parts[1]))


def gt(roots: list[Path], subject: str, expression: str) -> SurfaceIndex:
    folder = next(r / subject for r in roots if (r / subject).is_dir())
    return _surface(folder / f"{EXPRESSION_NAMES.index(expression):03d}" / "scan.ply")


@functools.lru_cache(maxsize=None)
def _surface(path: Path) -> SurfaceIndex:
    # Every row measures against every scan: load each scan and build its distance tree once per main() call.
    return SurfaceIndex(load_mesh(path))


def _row(variant: str, run: Path, e: str, subjects: list[str], scans: list[Path], box) -> dict:
    s = run.name
    mesh, own = SurfaceIndex(load_mesh(run / "geometry" / f"{e}.ply")), gt(scans, s, e)
    start = SurfaceIndex(load_mesh(run / "geometry" / f"init_{e}.ply"))
    other_exprs = sorted(f.stem for f in (run / "geometry").glob("*.ply") if f.stem != e and f.stem in EXPRESSION_NAMES)
    row = {"variant": variant, "subject": s, "expression": e}
    for name, dist in (("", cd), ("face_", lambda a, b: region_cd(a, b, box))):
        others = {t: dist(mesh, gt(scans, t, e)) for t in subjects if t != s}
        exprs = {x: dist(mesh, gt(scans, s, x)) for x in other_exprs}
        d_own, d_start = dist(mesh, own), dist(start, own)
        row.update({f"{name}own": d_own, f"{name}start": d_start, f"{name}gain": 1 - d_own / d_start,
                    f"{name}others": others, f"{name}nearest_other": min(others.values()) if others else None,
                    f"{name}own_other_expressions": exprs,
                    f"{name}closer_than_others": bool(others) and d_own < min(others.values()),
                    f"{name}closer_than_other_expressions": bool(exprs) and d_own < min(exprs.values())})
    row["face_expression_move"] = expression_move(run, e, other_exprs, scans, box)
    return row


def expression_move(run: Path, e: str, other_exprs: list[str], scans: list[Path], box) -> dict[str, float]:
    """How far apart the run's meshes of ``e`` and each other expression are (face region), as a fraction of how
    far apart the subject's ground truths are: 0 = the expression codes changed nothing, 1 = as much as the truth
    (in any direction; ``face_closer_than_other_expressions`` says whether it is the right one)."""
    geo, s = run / "geometry", run.name
    mesh = SurfaceIndex(load_mesh(geo / f"{e}.ply"))
    return {x: region_cd(mesh, load_mesh(geo / f"{x}.ply"), box) / region_cd(gt(scans, s, e), gt(scans, s, x), box)
            for x in other_exprs}


def split_seed(variant: str) -> tuple[str, int]:
    """``"id.s2"`` -> ``("id", 2)``; a name without the suffix is seed 0."""
    m = re.fullmatch(r"(.+)\.s(\d+)", variant)
    return (m.group(1), int(m.group(2))) if m else (variant, 0)


_MEASURES = ("mean_gain", "closer_than_others", "closer_than_other_expressions")


def summarise(rows: list[dict]) -> dict:
    """Per variant and region: mean gain vs the start, fraction of rows closer to own subject / expression."""
    summary = {}
    for v in sorted({r["variant"] for r in rows}):
        rs = [r for r in rows if r["variant"] == v]
        summary[v] = {"rows": len(rs)}
        for name in ("", "face_"):
            summary[v].update({
                f"{name}mean_gain": sum(r[f"{name}gain"] for r in rs) / len(rs),
                f"{name}closer_than_others": sum(r[f"{name}closer_than_others"] for r in rs) / len(rs),
                f"{name}closer_than_other_expressions":
                    sum(r[f"{name}closer_than_other_expressions"] for r in rs) / len(rs)})
        moves = [m for r in rs for m in r["face_expression_move"].values()]
        summary[v]["face_expression_move"] = sum(moves) / len(moves) if moves else None
    return summary


def over_seeds(summary: dict) -> dict:
    """For each variant run under several seeds: the seeds, and each measure's mean, min and max over them."""
    groups: dict[str, dict[int, dict]] = {}
    for v, s in summary.items():
        base, seed = split_seed(v)
        groups.setdefault(base, {})[seed] = s
    out = {}
    for base, by_seed in sorted(groups.items()):
        if len(by_seed) < 2:
            continue
        out[base] = {"seeds": sorted(by_seed)}
        for key in [f"{name}{m}" for name in ("", "face_") for m in _MEASURES] + ["face_expression_move"]:
            vals = [by_seed[k][key] for k in sorted(by_seed)]
            if any(v is None for v in vals):
                continue
            out[base][key] = {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}
    return out


def _row_key(paths: list[Path], scans_digest: str, box) -> str:
    return json_digest([scans_digest, [file_sha256(p) for p in paths], box[0].tolist(), box[1].tolist(),
                        N_SAMPLES, FACE_MARGIN, FACE_FRACTION])


def cached_row(work: Path, variant: str, run: Path, e: str, subjects: list[str], scans: list[Path], box,
               scans_digest: str) -> dict:
    """:func:`_row`, reused from WORK/metrics_cache when the meshes, the scans and the box are the same."""
    geo = run / "geometry"
    inputs = [geo / f"{e}.ply", geo / f"init_{e}.ply"] + sorted(
        f for f in geo.glob("*.ply") if f.stem != e and f.stem in EXPRESSION_NAMES)
    key = _row_key(inputs, scans_digest, box)
    cache = work / "metrics_cache" / variant / run.name / f"{e}.json"
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            row = stored["row"]
            if "face_expression_move" not in row:  # a row measured before the move was: add it alone
                other_exprs = [f.stem for f in inputs[2:]]
                row["face_expression_move"] = expression_move(run, e, other_exprs, scans, box)
                atomic_write_text(cache, json.dumps({"key": key, "row": row}), record=False)
            return row
    row = _row(variant, run, e, subjects, scans, box)
    atomic_write_text(cache, json.dumps({"key": key, "row": row}), record=False)
    return row


def main(work: Path) -> dict:
    _surface.cache_clear()  # a scan rewritten since the last call is read again
    scans = [work / "scans", work / "heldout"]  # train and held-out subjects: all count as "other subjects"
    subjects = sorted(p.name for r in scans for p in r.iterdir() if p.is_dir() and p.name.isdigit())
    scan_files = [p for r in scans for p in sorted(r.glob("[0-9][0-9][0-9]/[0-9][0-9][0-9]/scan.ply"))]
    box = face_box([load_mesh(p) for p in scan_files])
    scans_digest = json_digest({p.relative_to(p.parents[2]).as_posix(): file_sha256(p) for p in scan_files})
    rows = []
    for variant_dir in sorted(p for p in (work / "runs").iterdir() if p.is_dir()):
        for run in sorted(p for p in variant_dir.iterdir() if p.is_dir()):
            for res in sorted((run / "geometry").glob("*.ply")):
                if res.stem in EXPRESSION_NAMES and (run / "geometry" / f"init_{res.stem}.ply").is_file():
                    rows.append(cached_row(work, variant_dir.name, run, res.stem, subjects, scans, box,
                                           scans_digest))
    summary = summarise(rows)
    out = {"face_box": [box[0].tolist(), box[1].tolist()], "summary": summary, "seeds": over_seeds(summary),
           "rows": rows}
    atomic_write_text(work / "metrics.json", json.dumps(out, indent=1), record=False)
    return out


if __name__ == "__main__":
    result = main(Path(sys.argv[1]))
    print(json.dumps({"summary": result["summary"], "seeds": result["seeds"]}, indent=1))
