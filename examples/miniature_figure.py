"""The miniature experiment's figure (README "Miniature experiment"): held-out heads next to their ground truth,
the prior's sample grid and the metrics table, as WORK/figure.png and WORK/figure.html. Usage:

    python examples/miniature_figure.py WORK   # after examples/miniature_metrics.py WORK

figure.png: one row per held-out subject and expression; columns: ground truth, the SDS result with the ID tokens
on (runs/id), off (runs/no_id), the oracle control (runs/oracle, blank when not run) and the start (the generic
template), each as a normal map from the front and from 40 degrees to the side.
"""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path

import numpy as np
import torch

from idto3d.core.expressions import EXPRESSION_NAMES
from idto3d.geometry.mesh_io import load_mesh
from idto3d.priors.sampling import image_grid
from idto3d.render.camera import orbit_camera
from idto3d.render.normals import render_normal_map
from idto3d.render.preview import save_png

SIZE = 128
AZIMUTHS = (0.0, 40.0)


def _views(path: Path) -> list[torch.Tensor]:
    if not path.is_file():
        return [torch.ones(SIZE, SIZE, 3) for _ in AZIMUTHS]
    cams = orbit_camera(0.0, list(AZIMUTHS), 3.0, 30.0)
    return list(render_normal_map(load_mesh(path), cams, SIZE).image.cpu())


def heads_figure(work: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """The grid image, its row labels and column labels."""
    columns = ["ground truth", "ID on", "ID off", "oracle", "start (template)"]
    images, rows = [], []
    for run in sorted((work / "runs" / "id").iterdir()):
        s = run.name
        for res in sorted((run / "geometry").glob("*.ply")):
            e = res.stem
            if e not in EXPRESSION_NAMES:
                continue
            truth = work / "heldout" / s / f"{EXPRESSION_NAMES.index(e):03d}" / "scan.ply"
            for p in (truth, res, work / "runs" / "no_id" / s / "geometry" / f"{e}.ply",
                      work / "runs" / "oracle" / s / "geometry" / f"{e}.ply", run / "geometry" / f"init_{e}.ply"):
                images += _views(p)
            rows.append(f"{s} {e}")
    return image_grid(torch.stack(images), len(columns) * len(AZIMUTHS)), rows, columns


def _table(metrics: dict) -> str:
    head = ("<tr><th>variant</th><th>subject</th><th>expression</th><th>whole head: own / start / nearest other"
            "</th><th>face: own / start / nearest other</th><th>face gain</th></tr>")
    body = "".join(
        f"<tr><td>{html.escape(r['variant'])}</td><td>{r['subject']}</td><td>{html.escape(r['expression'])}</td>"
        f"<td>{r['own']:.4f} / {r['start']:.4f} / {r['nearest_other']:.4f}</td>"
        f"<td>{r['face_own']:.4f} / {r['face_start']:.4f} / {r['face_nearest_other']:.4f}</td>"
        f"<td>{100 * r['face_gain']:.0f} %</td></tr>" for r in metrics["rows"])
    return f"<table border=1 cellpadding=3>{head}{body}</table>"


def main(work: Path) -> Path:
    grid, rows, columns = heads_figure(work)
    save_png(grid, work / "figure.png")
    metrics = json.loads((work / "metrics.json").read_text()) if (work / "metrics.json").is_file() else None
    check = work / "prior_check.json"
    page = ["<!doctype html><meta charset=utf-8><title>idto3d miniature experiment</title>",
            "<h1>Miniature experiment</h1>",
            "<h2>Held-out heads (normal maps, front and 40&deg;)</h2>",
            f"<p>columns: {' | '.join(html.escape(c) for c in columns)}; rows: {', '.join(rows)}</p>",
            "<img src=figure.png>",
            ("<h2>Prior samples (rows: held-out identities; columns: expressions)</h2><img src=samples.png "
             "style='image-rendering:pixelated;width:50%'>")]
    if metrics:
        page += ["<h2>Chamfer (working units; 0.01 = 2 mm)</h2>", _table(metrics),
                 f"<pre>{html.escape(json.dumps(metrics['summary'], indent=1))}</pre>"]
        if metrics.get("seeds"):
            page += ["<h2>Over SDS seeds (mean, min, max)</h2>",
                     f"<pre>{html.escape(json.dumps(metrics['seeds'], indent=1))}</pre>"]
    if check.is_file():
        page += ["<h2>Prior check</h2>", f"<pre>{html.escape(check.read_text())}</pre>"]
    (work / "figure.html").write_text("\n".join(page) + "\n", encoding="utf-8")
    return work / "figure.html"


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
