"""The report's answer-first block: is the head the same person as the photos, which expressions were made,
and how long it took. Plain data (``Headline``) and its HTML, so tests can check the verdict against the
numbers it is built from."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Verdict:
    """Mean identity distance of the renders to the references against the backend's same-person threshold."""

    same: bool | None          # None: no face found in any render (or no metrics yet)
    distance: float | None
    threshold: float | None
    backend: str
    same_rate: float | None    # share of renders with a face whose distance is under the threshold
    with_face: int
    renders: int

    def sentence(self) -> str:
        if self.distance is None or self.threshold is None:
            return ("Not measured yet: run `idto3d evaluate RUN --references photos...`." if self.renders == 0
                    else f"No face found in any of the {self.renders} renders ({self.backend}).")
        op, words = ("<", "Likely the same person") if self.same else ("≥", "Likely not the same person")
        return f"{words}: distance {self.distance:.2f} {op} {self.threshold:.2f} ({self.backend})"

    def detail(self) -> str:
        if self.renders == 0:
            return ""
        parts = []
        if self.same_rate is not None:
            parts.append(f"{self.same_rate:.0%} of the {self.with_face} views with a face are under the threshold")
        missed = self.renders - self.with_face
        parts.append(f"{missed} of {self.renders} views without a face" if missed else
                     f"a face in all {self.renders} views")
        return "; ".join(parts) + "."


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def verdict(metrics: dict) -> Verdict:
    """The verdict from ``metrics.json`` (``identity.distance.mean`` against ``identity.threshold``)."""
    ident = metrics.get("identity") if isinstance(metrics.get("identity"), dict) else {}
    dist = ident.get("distance")
    distance = _number(dist.get("mean")) if isinstance(dist, dict) else _number(dist)
    threshold = _number(ident.get("threshold"))
    renders = int(ident.get("renders") or 0)
    missed = int(ident.get("faces_missed") or 0)
    same = None if distance is None or threshold is None else distance < threshold
    return Verdict(same=same, distance=distance, threshold=threshold, backend=str(metrics.get("backend", "?")),
                   same_rate=_number(ident.get("same_person_rate")), with_face=max(renders - missed, 0),
                   renders=renders)


def format_seconds(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    h, rem = divmod(s, 3600)
    return f"{h} h {rem // 60:02d} min" if h else f"{rem // 60} min {rem % 60:02d} s"


def headline_html(metrics: dict, expressions: list[str], stage_seconds: dict[str, float]) -> str:
    """``<section id="headline">``: verdict, expressions, time taken (per stage in a line below)."""
    v = verdict(metrics)
    cls = {True: "same", False: "different", None: "unknown"}[v.same]
    e = html.escape
    rows = [f'<p class="verdict {cls}" id="verdict">{e(v.sentence())}</p>']
    if v.detail():
        rows.append(f'<p class="note">{e(v.detail())}</p>')
    exprs = ", ".join(expressions) if expressions else "none exported yet"
    rows.append(f"<p><b>Expressions:</b> {e(exprs)}</p>")
    if stage_seconds:
        total = sum(stage_seconds.values())
        each = ", ".join(f"{k} {format_seconds(s)}" for k, s in stage_seconds.items())
        rows.append(f'<p><b>Time taken:</b> {e(format_seconds(total))} <span class="note">({e(each)})</span></p>')
    else:
        rows.append('<p><b>Time taken:</b> <span class="note">no stage records in this run folder</span></p>')
    return '<section id="headline"><h2>Summary</h2>\n' + "\n".join(rows) + "\n</section>\n"
