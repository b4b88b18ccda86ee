"""The batch's results: one record per identity, written as ``OUT/batch.json`` and ``OUT/batch.html``.

A record's numbers come from its run folder (each step's finished marker records its wall time; an evaluated
run's ``report/metrics.json`` has the identity distance of the neutral front render), so a row skipped because
it had finished reports the same as when it ran.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from idto3d.core.atomic import atomic_write_text
from idto3d.core.run_layout import RunLayout

FORMAT = "idto3d.batch/1"
STATUSES = ("pending", "running", "done", "failed")
THUMB = 128  # px, the HTML's thumbnail of the neutral front view


@dataclass
class RowRecord:
    name: str
    run: str                                  # the run folder, relative to OUT
    status: str = "pending"                   # pending | running | done | failed
    skipped: bool = False                     # finished before this batch: not run again
    error: str | None = None                  # the one-line reason of a failed row
    attempts: int = 0                         # task starts this batch (> 1: Ray retried a dead worker)
    node: str | None = None
    pid: int | None = None
    resources: dict[str, float] = field(default_factory=dict)  # what Ray assigned to the last attempt
    intervals: list[list[float | None]] = field(default_factory=list)  # [start, end] per attempt (epoch s)
    wall_seconds: float | None = None         # the successful attempt's task time
    stage_seconds: dict[str, float] = field(default_factory=dict)
    exported: int = 0                         # GLB heads in export/
    identity_distance: float | None = None    # neutral front render vs the reference photos (evaluated runs)
    same_person_rate: float | None = None     # share of the grid's renders under the backend's threshold
    evaluation: str | None = None             # with --evaluate: done, kept, or why the run was not evaluated
    turntable: str | None = None              # renders/<expr>_turntable.png, relative to OUT
    report: str | None = None                 # the run's report/index.html (or the run folder), relative to OUT


def collect_run_outputs(record: RowRecord, out: Path) -> None:
    """Fill the record's numbers and links from its run folder."""
    layout = RunLayout(out / record.run)
    record.stage_seconds = {}
    for step, path in layout.stage_reports.items():
        seconds = _read_json(path).get("seconds")
        if isinstance(seconds, (int, float)):
            record.stage_seconds[step] = round(float(seconds), 2)
    record.exported = len(list(layout.export.glob("*.glb"))) if layout.export_done.exists() else 0
    metrics = _read_json(layout.metrics)
    record.identity_distance = front_identity_distance(metrics)
    rate = (metrics.get("identity") or {}).get("same_person_rate")
    record.same_person_rate = float(rate) if isinstance(rate, (int, float)) else None
    names = layout.turntable_expressions()
    expr = "neutral" if "neutral" in names else (names[0] if names else None)
    png = layout.turntable(expr) if expr else None
    record.turntable = png.relative_to(out).as_posix() if png is not None and png.exists() else None
    report = layout.report_index if layout.report_index.exists() else layout.root
    record.report = (report.relative_to(out).as_posix() + ("" if report.is_file() else "/")) \
        if report.exists() else None  # a row that failed before computing anything has no folder


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def front_identity_distance(metrics: dict[str, Any]) -> float | None:
    """The identity distance of the reference view (neutral, elevation 0, azimuth 0) in ``metrics.json``."""
    ref = metrics.get("reference_view") or {}
    views = (metrics.get("identity") or {}).get("per_view") or []
    for v in views:
        if (v.get("expression") == ref.get("expression", "neutral") and v.get("elevation") == ref.get("elevation", 0)
                and v.get("azimuth") == ref.get("azimuth", 0)):
            d = v.get("distance")
            return float(d) if isinstance(d, (int, float)) and math.isfinite(d) else None
    return None


def counts(records: list[RowRecord]) -> dict[str, int]:
    return {s: sum(r.status == s for r in records) for s in STATUSES}


def write_results(out: Path, records: list[RowRecord], meta: dict[str, Any], final: bool) -> tuple[Path, Path]:
    """``OUT/batch.json`` (rewritten live while the batch runs) and, at the end, ``OUT/batch.html``."""
    doc = {"format": FORMAT, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "finished": final,
           **meta, "counts": counts(records), "rows": [asdict(r) for r in records]}
    js = atomic_write_text(out / "batch.json", json.dumps(doc, indent=2))
    page = out / "batch.html"
    if final:
        atomic_write_text(page, render_html(out, doc, records))
    return js, page


def _thumbnail(out: Path, record: RowRecord) -> str | None:
    """The neutral turntable's first (front) frame, shrunk, as a data URI: the page stays one file."""
    if record.turntable is None:
        return None
    from PIL import Image

    try:
        with Image.open(out / record.turntable) as im:
            side = min(im.size)  # frames are square and the front view comes first (top-left)
            front = im.convert("RGB").crop((0, 0, side, side))
    except OSError:
        return None
    front.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    front.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:4px 8px;vertical-align:middle}.done{color:#070}.failed{color:#b00}.skipped{color:#777}")


def render_html(out: Path, doc: dict[str, Any], records: list[RowRecord]) -> str:
    e = html.escape
    c = doc["counts"]
    rows = []
    for r in records:
        thumb = _thumbnail(out, r)
        img = f'<img src="{thumb}" alt="{e(r.name)}" width="{THUMB}">' if thumb else ""
        times = ", ".join(f"{k} {v:.1f} s" for k, v in r.stage_seconds.items())
        dist = "" if r.identity_distance is None else f"{r.identity_distance:.3f}"
        if r.same_person_rate is not None:
            dist += f" ({100 * r.same_person_rate:.0f} % of views same person)"
        elif r.evaluation and r.evaluation.startswith("not"):
            dist = r.evaluation
        link = f'<a href="{e(r.report)}">{e(r.name)}</a>' if r.report else e(r.name)
        status = r.status + (" (reused)" if r.skipped else "") + (f", {r.attempts} attempts" if r.attempts > 1 else "")
        rows.append(f'<tr><td>{link}</td><td class="{e(r.status)}">{e(status)}</td><td>{img}</td>'
                    f'<td>{e(times)}</td><td>{e(dist)}</td><td>{r.exported}</td><td>{e(r.error or "")}</td></tr>')
    head = "".join(f"<th>{h}</th>" for h in ("identity", "status", "neutral turntable", "stage times",
                                              "identity distance (front)", "heads", "error"))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>idto3d batch</title><style>{_CSS}</style>"
            f"</head><body><h1>idto3d batch</h1><p>{c['done']} done, {c['failed']} failed of {len(records)} "
            f"(manifest {e(str(doc.get('manifest', '')))}, updated {e(doc['updated'])})</p>"
            f"<table><tr>{head}</tr>{''.join(rows)}</table></body></html>\n")
