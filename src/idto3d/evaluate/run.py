"""``idto3d evaluate``: the paper's section-4 measurements on finished runs, written to ``RUN/report/``.

For every run: each exported expression (``export/<expression>.glb``) is rendered over the camera grid
(``views``), every render is embedded with the identity backend and compared with the reference photos
(``similarity``) and with the neutral expression's front render; FID when the user gives the feature network
and reference folders. Per run it writes (``report/``)::

    renders_<expression>.png   contact sheet: rows = elevations (highest first), columns = azimuths
    similarity.png             violins: renders vs references per expression; expressions vs neutral front
    per_view.png               table of mean cosine / distance / faces found per view
    tsne.png                   t-SNE of the render (and reference) embeddings of all runs evaluated together
    comparison.png             (several runs) one violin per run, side by side
    metrics.json               written last; keys documented in ``METRICS_KEYS`` and the README

then calls ``idto3d.evaluate.report.write_report(run_dir, metrics)`` when that module exists.
"""

from __future__ import annotations

import importlib
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console

from idto3d import __version__
from idto3d.core.atomic import atomic_write, atomic_write_text
from idto3d.core.config import Config
from idto3d.core.errors import IdtoError
from idto3d.core.run_layout import RunLayout
from idto3d.evaluate import plots
from idto3d.evaluate.assets import load_exported_head, run_heads
from idto3d.evaluate.similarity import (
    FaceEmbedder, References, cosine_and_distance, embed_images, embed_references, make_embedder, summary,
)
from idto3d.evaluate.views import CameraGrid, camera_grid, check_resolution, render_grid, render_normal_grid
from idto3d.export.turntable import camera_radius, frame_grid
from idto3d.core.progress import progress_bar

FORMAT = "idto3d.metrics/1"
NEUTRAL = "neutral"
FRONT = (0.0, 0.0)  # (elevation, azimuth) of the reference render across expressions (paper figure 6 right)
# The top-level keys of metrics.json (format idto3d.metrics/1); the README documents each.
METRICS_KEYS = ("format", "version", "created", "run", "name", "references", "backend", "grid", "identity",
                "expressions", "reference_view", "fid", "timings", "files")


@dataclass
class _RunData:
    """Everything measured on one run before the files are written."""

    run_dir: Path
    label: str
    heads: dict[str, Path]                          # expression -> exported GLB
    names: list[str]
    renders: dict[str, np.ndarray]                 # expression -> uint8 [N, H, W, 3]
    embeddings: dict[str, list[np.ndarray | None]]  # expression -> per view
    front: np.ndarray | None                        # the neutral front render's embedding
    front_expression: str
    radius: float
    fid: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)


def _labels(runs: Sequence[Path]) -> list[str]:
    """Short, distinct names for the plots: the folder name, with its parent when two runs share a name."""
    names = [r.name or str(r) for r in runs]
    return [f"{r.parent.name}/{n}" if names.count(n) > 1 else n for r, n in zip(runs, names)]


def _check_fid_inputs(fid_images: Path | None, fid_normals: Path | None, inception: Path | None) -> None:
    if inception is None:
        if fid_images is not None or fid_normals is not None:
            raise IdtoError("FID needs the Inception feature network: pass --inception FILE.onnx (it cannot be "
                            "downloaded here; see the README's FID section for how to make one)")
        return
    if not Path(inception).is_file():
        raise IdtoError(f"Inception feature network not found: {inception}")
    if fid_images is None and fid_normals is None:
        raise IdtoError("--inception was given without reference folders: pass --fid-images DIR (texture FID) "
                        "and/or --fid-normals DIR (geometry FID)")
    for folder, what in ((fid_images, "--fid-images"), (fid_normals, "--fid-normals")):
        if folder is not None and not Path(folder).is_dir():
            raise IdtoError(f"{what} {folder} is not a folder of reference images")


def _front_embedding(heads: dict[str, Path], grid: CameraGrid, resolution: int,
                     embeddings: dict[str, list], embedder: FaceEmbedder) -> tuple[str, np.ndarray | None]:
    """The neutral expression's (else the first's) front render embedding: reused from the grid when the grid
    has the front view, else rendered on its own."""
    name = NEUTRAL if NEUTRAL in heads else next(iter(heads))
    if FRONT in grid.views:
        return name, embeddings[name][grid.views.index(FRONT)]
    front = CameraGrid((FRONT[0],), (FRONT[1],), grid.fov)
    image = render_grid(load_exported_head(heads[name]), front, resolution)[0]
    return name, embed_images([image], embedder)[0]


def _measure_run(run_dir: Path, label: str, heads: dict[str, Path], grid: CameraGrid, resolution: int,
                 embedder: FaceEmbedder, fid_inputs: tuple[Path | None, Path | None, Path | None],
                 console: Console | None, progress: bool) -> _RunData:
    renders, embeddings, seconds = {}, {}, {"render": 0.0, "identity": 0.0, "fid": 0.0}
    normals: list[np.ndarray] = []
    fid_images, fid_normals, inception = fid_inputs
    radius = 0.0
    with progress_bar(f"evaluate {label}", len(heads) * len(grid), console, enabled=progress) as update:
        for name, glb in heads.items():
            t = time.perf_counter()
            head = load_exported_head(glb)
            radius = camera_radius(head.mesh.vertices.numpy(), grid.fov)
            renders[name] = render_grid(head, grid, resolution)
            if inception is not None and fid_normals is not None:
                normals += list(render_normal_grid(head, grid, resolution))
            seconds["render"] += time.perf_counter() - t
            t = time.perf_counter()
            embeddings[name] = embed_images(renders[name], embedder, on_image=update)
            seconds["identity"] += time.perf_counter() - t
    t = time.perf_counter()
    front_name, front = _front_embedding(heads, grid, resolution, embeddings, embedder)
    seconds["identity"] += time.perf_counter() - t
    fid = {"texture": None, "geometry": None}
    if inception is not None:
        t = time.perf_counter()
        from idto3d.evaluate.fid import fid_from_folders  # FID's torchmetrics import only when asked for

        if fid_images is not None:
            fid["texture"] = float(fid_from_folders([im for r in renders.values() for im in r], Path(fid_images),
                                                    Path(inception)))
        if fid_normals is not None:
            fid["geometry"] = float(fid_from_folders(normals, Path(fid_normals), Path(inception)))
        seconds["fid"] = time.perf_counter() - t
    return _RunData(run_dir, label, heads, list(heads), renders, embeddings, front, front_expression=front_name,
                    radius=radius, fid=fid, seconds=seconds)


def _stage_timings(run_dir: Path) -> dict[str, float]:
    """The wall time (``seconds``) each finished step recorded, in the order the pipeline runs them."""
    out = {}
    for stage, path in RunLayout(run_dir).stage_reports.items():
        try:
            seconds = json.loads(path.read_text(encoding="utf-8")).get("seconds")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(seconds, (int, float)) and math.isfinite(seconds):
            out[stage] = round(float(seconds), 3)
    return out


def _round(x: float) -> float | None:
    return None if not math.isfinite(x) else round(float(x), 6)


def _identity_metrics(data: _RunData, grid: CameraGrid, refs: References, threshold: float) -> dict:
    per_view, all_cos, all_dist, per_expression = [], [], [], {}
    for name in data.names:
        cos, dist = cosine_and_distance(data.embeddings[name], refs.mean)
        for (el, az), c, d in zip(grid.views, cos, dist):
            per_view.append({"expression": name, "elevation": el, "azimuth": az, "cosine": _round(c),
                             "distance": _round(d)})
        per_expression[name] = {"cosine": summary(cos), "distance": summary(dist),
                                "faces_missed": int(np.isnan(cos).sum())}
        all_cos.append(cos)
        all_dist.append(dist)
    cos, dist = np.concatenate(all_cos), np.concatenate(all_dist)
    found = np.isfinite(dist)
    return {"cosine": summary(cos), "distance": summary(dist), "threshold": threshold,
            "same_person_rate": round(float((dist[found] < threshold).mean()), 6) if found.any() else None,
            "renders": int(cos.size), "faces_missed": int((~found).sum()), "per_expression": per_expression,
            "per_view": per_view}


def _to_front(data: _RunData, grid: CameraGrid) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per expression: cosine and distance of each render to the neutral front render (empty when that render
    has no face). The reference render itself (cosine 1) is left out."""
    if data.front is None:
        return {}
    out = {}
    for name in data.names:
        cos, dist = cosine_and_distance(data.embeddings[name], data.front)
        if name == data.front_expression and FRONT in grid.views:
            keep = np.arange(len(grid)) != grid.views.index(FRONT)
            cos, dist = cos[keep], dist[keep]
        out[name] = (cos, dist)
    return out


def _expression_metrics(data: _RunData, grid: CameraGrid) -> dict:
    scores = _to_front(data, grid)
    empty = (np.array([]), np.array([]))
    return {name: {"cosine_to_neutral_front": summary(scores.get(name, empty)[0]),
                   "distance_to_neutral_front": summary(scores.get(name, empty)[1])} for name in data.names}


def _per_view_table(data: _RunData, grid: CameraGrid, refs: References) -> tuple[np.ndarray, ...]:
    cos = np.stack([cosine_and_distance(data.embeddings[n], refs.mean)[0] for n in data.names])  # [X, N]
    dist = np.sqrt(np.clip(2.0 - 2.0 * cos, 0.0, None))
    found = np.isfinite(cos)
    with warnings.catch_warnings():  # an all-missed view is NaN, drawn as "no face"
        warnings.simplefilter("ignore", RuntimeWarning)
        mean_cos, mean_dist = np.nanmean(cos, axis=0), np.nanmean(dist, axis=0)
    counts = np.stack([found.sum(0), np.full(found.shape[1], found.shape[0])], axis=-1)
    return mean_cos, mean_dist, counts


def _contact_sheet(images: np.ndarray, grid: CameraGrid) -> np.ndarray:
    """Rows = elevations, highest at the top (as in per_view.png); columns = azimuths, lowest at the left."""
    rows = images.reshape(len(grid.elevations), len(grid.azimuths), *images.shape[1:])[::-1]
    return frame_grid(rows.reshape(images.shape), columns=len(grid.azimuths))


def _save_png(path: Path, image: np.ndarray) -> Path:
    return atomic_write(path, lambda p: Image.fromarray(image).save(p, format="PNG"))


def _rel(path: Path | None, run_dir: Path) -> str | None:
    return None if path is None else path.relative_to(run_dir).as_posix()


@dataclass
class _Joint:
    """What every run's report shares: the references, the backend, the t-SNE and the per-run comparison."""

    grid: CameraGrid
    resolution: int
    refs: References
    backend: str
    threshold: float
    fid_inputs: tuple[Path | None, Path | None, Path | None]
    tsne: tuple[np.ndarray, list[str], list[str]]      # points (2-D, or the embeddings when < 3), groups, expressions
    runs_cosine: dict[str, list[float]]                 # run label -> cosines of all its renders (comparison plot)
    seconds: float                                      # time spent on the joint parts


def _joint_tsne(measured: list[_RunData], refs: References) -> tuple[np.ndarray, list[str], list[str]]:
    """One t-SNE over every run's renders and the references (paper figure 6 middle), computed once."""
    points, groups, exprs = [], [], []
    for data in measured:
        for name in data.names:
            for e in data.embeddings[name]:
                if e is not None:
                    points.append(e)
                    groups.append(data.label)
                    exprs.append(name)
    points += list(refs.embeddings)
    groups += ["references"] * len(refs.embeddings)
    exprs += [""] * len(refs.embeddings)
    emb = np.asarray(points)
    return (plots.tsne_points(emb) if len(emb) >= 3 else emb), groups, exprs


def _report_run(data: _RunData, ident: dict, joint: _Joint) -> dict:
    """Write one run's PNGs, then its ``metrics.json`` (last); returns the metrics."""
    t = time.perf_counter()
    grid, run_dir = joint.grid, data.run_dir
    layout = RunLayout(run_dir)
    out = layout.report
    renders = {n: _save_png(out / f"renders_{n}.png", _contact_sheet(data.renders[n], grid)) for n in data.names}
    to_refs = {n: [v["cosine"] for v in ident["per_view"] if v["expression"] == n and v["cosine"] is not None]
               for n in data.names}
    if len(data.names) > 1:
        to_refs = {"all": [c for v in to_refs.values() for c in v], **to_refs}
    to_front = {n: c for n, (c, _) in _to_front(data, grid).items()}
    similarity = plots.similarity_figure(out / "similarity.png", to_refs, to_front,
                                         title=f"{data.label}: identity similarity ({joint.backend})")
    per_view = plots.per_view_figure(out / "per_view.png", grid.elevations, grid.azimuths,
                                     *_per_view_table(data, grid, joint.refs), threshold=joint.threshold,
                                     title=data.label)
    xy, groups, exprs = joint.tsne
    tsne = plots.tsne_figure(out / "tsne.png", xy, groups, exprs, precomputed=True,
                             title=f"t-SNE of identity embeddings ({len(xy)} faces: renders of "
                                   f"{len(joint.runs_cosine)} run(s) + references)")
    comparison = None
    if len(joint.runs_cosine) > 1:
        comparison = plots.comparison_figure(out / "comparison.png", joint.runs_cosine,
                                             title=f"identity similarity per run ({joint.backend})")
    else:  # a comparison left by an earlier evaluation with other runs would no longer match metrics.json
        (out / "comparison.png").unlink(missing_ok=True)
    data.seconds["plots"] = time.perf_counter() - t + joint.seconds
    data.seconds["total"] = sum(data.seconds.values())
    fid_images, fid_normals, inception = joint.fid_inputs
    turntables = {n: layout.turntable(n) for n in data.names}
    metrics = {
        "format": FORMAT,
        "version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": str(run_dir.resolve()),
        "name": data.label,
        "references": [str(p.resolve()) for p in joint.refs.paths],
        "backend": joint.backend,
        "grid": {"elevations": list(grid.elevations), "azimuths": list(grid.azimuths), "fov": grid.fov,
                 "radius": round(data.radius, 6), "resolution": joint.resolution, "lighting": "studio",
                 "views": len(grid)},
        "identity": ident,
        "expressions": _expression_metrics(data, grid),
        "reference_view": {"expression": data.front_expression, "elevation": FRONT[0], "azimuth": FRONT[1],
                           "face_found": data.front is not None},
        "fid": {**data.fid, **{k: None if p is None else str(Path(p).resolve())
                               for k, p in (("inception", inception), ("images", fid_images),
                                            ("normals", fid_normals))}},
        "timings": {"stages": _stage_timings(run_dir), "evaluate": {k: round(v, 3) for k, v in data.seconds.items()}},
        "files": {"metrics": layout.relative(layout.metrics), "similarity": _rel(similarity, run_dir),
                  "per_view": _rel(per_view, run_dir), "tsne": _rel(tsne, run_dir),
                  "comparison": _rel(comparison, run_dir),
                  "renders": {n: _rel(p, run_dir) for n, p in renders.items()},
                  "heads": {n: _rel(p, run_dir) for n, p in data.heads.items()},
                  "turntables": {n: _rel(p, run_dir) for n, p in turntables.items() if p.is_file()}},
    }
    # Written last: a metrics.json is only ever beside complete plots.
    atomic_write_text(layout.metrics, json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    return metrics


def evaluate_runs(runs: Sequence[str | Path], references: Sequence[str | Path], cfg: Config, *,
                  grid: CameraGrid | None = None, resolution: int = 256, fid_images: Path | None = None,
                  fid_normals: Path | None = None, inception: Path | None = None, console: Console | None = None,
                  progress: bool = True) -> dict:
    """Evaluate finished runs against reference photos; writes ``RUN/report/`` (module docstring) per run.

    Returns ``{"runs": [metrics per run], "comparison": [comparison.png per run] (empty for one run),
    "reports": [index.html or None per run], "seconds": total}``. All inputs are checked (run folders,
    exports, FID files, resolution, reference photos) before anything is rendered. Raises ``IdtoError``.
    """
    start = time.perf_counter()
    grid = grid if grid is not None else camera_grid()
    check_resolution(resolution)
    runs = [runs] if isinstance(runs, (str, Path)) else runs
    references = [references] if isinstance(references, (str, Path)) else references
    run_dirs = [Path(r) for r in runs]
    if not run_dirs:
        raise IdtoError("no run folder given; pass one or more folders made by `idto3d generate`")
    if len({r.resolve() for r in run_dirs}) != len(run_dirs):
        raise IdtoError("the same run folder was given twice; pass each run once")
    heads = [run_heads(r) for r in run_dirs]
    _check_fid_inputs(fid_images, fid_normals, inception)
    if not references:
        raise IdtoError("no reference photos given; pass --references with photos of the person (files or a folder)")
    embedder = make_embedder(cfg.identity)
    refs = embed_references(references, embedder)
    fid_inputs = (fid_images, fid_normals, inception)

    measured = [_measure_run(r, label, h, grid, resolution, embedder, fid_inputs, console, progress)
                for r, label, h in zip(run_dirs, _labels(run_dirs), heads)]

    t = time.perf_counter()
    identities = [_identity_metrics(d, grid, refs, embedder.threshold) for d in measured]
    runs_cosine = {d.label: [v["cosine"] for v in ident["per_view"] if v["cosine"] is not None]
                   for d, ident in zip(measured, identities)}
    tsne = _joint_tsne(measured, refs)
    joint = _Joint(grid, resolution, refs, embedder.name, embedder.threshold, fid_inputs, tsne, runs_cosine,
                   (time.perf_counter() - t) / len(measured))

    all_metrics, comparisons, reports = [], [], []
    for data, ident in zip(measured, identities):
        metrics = _report_run(data, ident, joint)
        all_metrics.append(metrics)
        if metrics["files"]["comparison"] is not None:
            comparisons.append(data.run_dir / metrics["files"]["comparison"])
        reports.append(_write_report(data.run_dir, metrics))
        if console is not None and ident["faces_missed"]:
            console.print(f"{data.label}: no face found in {ident['faces_missed']} of {ident['renders']} renders "
                          "(left out of the statistics; see per_view.png)", highlight=False)
    return {"runs": all_metrics, "comparison": comparisons, "reports": reports,
            "seconds": time.perf_counter() - start}


def _write_report(run_dir: Path, metrics: dict) -> Path | None:
    """The HTML report (``idto3d.evaluate.report``), when that module is installed."""
    try:
        report = importlib.import_module("idto3d.evaluate.report")
    except ModuleNotFoundError as exc:
        if exc.name == "idto3d.evaluate.report":
            return None
        raise
    write = getattr(report, "write_report", None)
    return None if write is None else Path(write(run_dir, metrics))
