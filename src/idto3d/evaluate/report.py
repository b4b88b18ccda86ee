"""``RUN/report/index.html``: a static page that answers first (headline: same person?, expressions, time
taken; ``headline.py``), then shows the three.js viewer of the exported GLBs, the turntables, the plots, timings
and config, with every raw metric collapsed at the end; and ``serve`` for ``idto3d view``.

The page needs no server and loads nothing remote. Over http (``idto3d view``) the viewer imports the
vendored three.js from ``report/vendor/three`` and fetches ``../export/<expression>.glb``. Browsers refuse
module files and ``fetch`` on ``file://``, so ``report/viewer/embedded.js`` (a classic script) also carries
the same modules and, while they total at most ``EMBED_LIMIT_BYTES``, the GLBs as base64: opening
``index.html`` straight from disk still shows the heads. Larger exports ask for ``idto3d view`` on the page.
"""

from __future__ import annotations

import functools
import html
import json
import re
import shutil
from base64 import b64encode
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from rich.console import Console

from idto3d import __version__
from idto3d.core.atomic import atomic_write_text
from idto3d.core.errors import IdtoError
from idto3d.core.run_layout import RunLayout
from idto3d.evaluate import viewer_assets
from idto3d.evaluate.headline import headline_html

EMBED_LIMIT_BYTES = 48 * 2**20
# Plots written by `idto3d evaluate`, in page order, with their captions.
PLOTS = {
    "similarity.png": "Identity cosine similarity to the reference photos over the camera grid",
    "per_view.png": "Similarity per view (elevation x azimuth)",
    "tsne.png": "t-SNE of render embeddings (colour: identity, marker: expression)",
    "comparison.png": "Runs side by side",
}
# How the timings table names each step's record (``RunLayout.stage_reports``).
STAGE_LABELS = {"template_fit": "template fit", "geometry_sds": "geometry SDS", "photo_texture": "photo texture",
                "texture_sds": "texture SDS"}
VIEWER_FILE_NOTE = ("The 3D viewer cannot load the heads from a file:// page here (the GLBs are too large "
                    "to embed): run `idto3d view RUN` and open the address it prints.")


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _url(rel: str) -> str:
    return quote(rel, safe="/")


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)) and all(not isinstance(x, (dict, list, tuple)) for x in v):
        return ", ".join(_fmt(x) for x in v)
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str)
    return str(v)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{a: {b: 1}}`` -> ``{"a.b": 1}``; lists of records stay as they are (shown as their own tables)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _is_records(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _kv_table(d: dict, head: tuple[str, str] = ("", "")) -> str:
    rows = [(k, v) for k, v in _flatten(d).items() if not _is_records(v)]
    if not rows:
        return ""
    th = f"<tr><th>{_e(head[0])}</th><th>{_e(head[1])}</th></tr>" if any(head) else ""
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt(v))}</td></tr>" for k, v in rows)
    return f'<div class="scroll"><table>{th}{body}</table></div>'


def _records_table(records: list[dict]) -> str:
    flat = [_flatten(r) for r in records]
    cols: list[str] = []
    for r in flat:
        cols += [k for k in r if k not in cols]
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_e(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in flat)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def _read_json(path: Path) -> tuple[dict | None, str | None]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"{path.name} could not be read: {exc}"
    return (data, None) if isinstance(data, dict) else (None, f"{path.name} is not a JSON object")


# ---------------------------------------------------------------- what the run holds


def exported_expressions(run_dir: Path) -> list[str]:
    """Names with an ``export/<name>.glb``, in the config's expression order, then the rest sorted."""
    layout = RunLayout(run_dir)
    found = {p.stem for p in layout.export.glob("*.glb") if p.is_file()}
    order: list[str] = []
    try:
        cfg = yaml.safe_load(layout.config.read_text(encoding="utf-8"))
        order = [str(x) for x in (cfg or {}).get("expressions", []) or []]
    except (OSError, yaml.YAMLError, AttributeError, TypeError):
        pass
    return [n for n in order if n in found] + sorted(found - set(order))


def _plots(report_dir: Path) -> list[tuple[str, str]]:
    present = {p.name for p in report_dir.glob("*.png") if p.is_file()}
    names = [n for n in PLOTS if n in present]
    names += sorted(n for n in present if n.startswith("renders_"))
    names += sorted(present - set(names))
    captions = {n: PLOTS.get(n) or (f"Renders: {n[len('renders_'):-4]}" if n.startswith("renders_") else n)
                for n in names}
    return [(n, captions[n]) for n in names]


# ---------------------------------------------------------------- sections


def _section(ident: str, title: str, body: str) -> str:
    return f'<section id="{ident}"><h2>{_e(title)}</h2>\n{body}\n</section>\n'


def _metrics_section(metrics: dict) -> str:
    if not metrics:
        return _section("metrics", "Identity metrics", '<p class="note">No metrics yet: run '
                        "<code>idto3d evaluate RUN --references photos...</code> to measure this run.</p>")
    parts = []
    run_info = {k: metrics[k] for k in ("run", "backend", "references", "grid") if k in metrics}
    if run_info:
        parts.append(_kv_table(run_info))
    identity = metrics.get("identity")
    if isinstance(identity, dict):
        parts.append("<h3>Similarity to the references</h3>" + _kv_table(identity))
        if _is_records(identity.get("per_view")):
            parts.append("<h3>Per view</h3>" + _records_table(identity["per_view"]))
    expressions = metrics.get("expressions")
    if isinstance(expressions, dict) and expressions:
        rows = [{"expression": n, **(v if isinstance(v, dict) else {"value": v})} for n, v in expressions.items()]
        parts.append("<h3>Across expressions</h3>" + _records_table(rows))
    if isinstance(metrics.get("fid"), dict):
        parts.append("<h3>FID</h3>" + _kv_table(metrics["fid"]))
    known = {"run", "backend", "references", "grid", "identity", "expressions", "fid", "timings", "format"}
    rest = {k: v for k, v in metrics.items() if k not in known}
    if rest:
        parts.append("<h3>Other</h3>" + _kv_table(rest))
    raw = json.dumps(metrics, indent=2, default=str)
    parts.append(f"<details><summary>metrics.json</summary><pre>{_e(raw)}</pre></details>")
    # Every number behind the headline, collapsed: the summary above answers first.
    return _section("metrics", "All metrics", '<details id="raw-metrics"><summary>Show all metrics (tables and '
                    'metrics.json)</summary>\n' + "\n".join(parts) + "\n</details>")


def _timings_section(run_dir: Path, metrics: dict) -> str:
    rows = []
    layout = RunLayout(run_dir)
    for stage, path in layout.stage_reports.items():
        label, rel = STAGE_LABELS[stage], layout.relative(path)
        if not path.is_file():
            continue
        data, problem = _read_json(path)
        if data is None:
            rows.append((label, None, problem, rel))
            continue
        details = {k: v for k, v in data.items() if k != "seconds" and not isinstance(v, dict)
                   and not (isinstance(v, list) and len(v) > 8)}
        rows.append((label, data.get("seconds"), "; ".join(f"{k}: {_fmt(v)}" for k, v in details.items()), rel))
    parts = []
    if rows:
        body = "".join(f"<tr><th>{_e(label)}</th><td>{_e(_fmt(s))}</td><td>{_e(d)}</td><td><code>{_e(rel)}</code>"
                       f"</td></tr>" for label, s, d, rel in rows)
        parts.append(f'<h3>Pipeline stages</h3><div class="scroll"><table><tr><th>stage</th><th>seconds</th>'
                     f"<th>details</th><th>from</th></tr>{body}</table></div>")
    timings = metrics.get("timings")
    if isinstance(timings, dict) and timings:
        parts.append("<h3>Evaluation</h3>" + _kv_table(timings, ("step", "seconds")))
    if not parts:
        parts.append('<p class="note">No stage reports in this run folder yet.</p>')
    return _section("timings", "Timings", "\n".join(parts))


def _tsne_useful(metrics: dict) -> bool:
    """A t-SNE of one run against one photo shows two blobs and says nothing: keep it for several runs
    (``comparison.png`` exists) or several references."""
    refs = metrics.get("references")
    files_ = metrics.get("files") if isinstance(metrics.get("files"), dict) else {}
    return (isinstance(refs, list) and len(refs) > 1) or bool(files_.get("comparison"))


def _plots_section(report_dir: Path, metrics: dict) -> str:
    plots = _plots(report_dir)
    note = ""
    if any(n == "tsne.png" for n, _ in plots) and not _tsne_useful(metrics):
        plots = [(n, c) for n, c in plots if n != "tsne.png"]
        note = ('<p class="note" id="tsne-absent">No t-SNE: it compares several runs or reference photos, and '
                "this evaluation had one run and one reference.</p>")
    if not plots:
        return _section("plots", "Plots", '<p class="note">No plots yet (<code>idto3d evaluate</code> '
                        "writes them here).</p>")
    figs = "\n".join(f'<figure><img src="{_url(n)}" alt="{_e(c)}" loading="lazy"><figcaption>{_e(c)}'
                     f"</figcaption></figure>" for n, c in plots)
    return _section("plots", "Plots", note + figs)


def _turntables_section(run_dir: Path) -> str:
    layout = RunLayout(run_dir)
    names = layout.turntable_expressions()
    parts = []
    for name in names:
        media = []
        video, still = layout.turntable(name, ".mp4"), layout.turntable(name, ".png")
        if video.is_file():
            media.append(f'<video src="{_url(layout.from_report(video))}" controls loop muted playsinline '
                         f'preload="metadata"></video>')
        if still.is_file():
            media.append(f'<img src="{_url(layout.from_report(still))}" alt="{_e(name)} turntable" '
                         f'loading="lazy">')
        parts.append(f"<figure>{''.join(media)}<figcaption>{_e(name)}</figcaption></figure>")
    done = layout.export_done
    if done.is_file():
        data, _ = _read_json(done)
        for note in (data or {}).get("notes", []) or []:
            parts.append(f'<p class="note">{_e(note)}</p>')
    if not names:
        parts.insert(0, f'<p class="note">No turntables in <code>{_e(layout.relative(layout.renders))}/</code> '
                        'yet.</p>')
    return _section("turntables", "Turntables", "\n".join(parts))


def _viewer_section(layout: RunLayout, names: list[str], three: Path | None, embedded: bool) -> str:
    if not names:
        return _section("viewer", "3D viewer", f'<p class="note">No exported heads (<code>'
                        f'{_e(layout.relative(layout.export))}/*.glb</code>) in this run yet.</p>')
    if three is None:
        return _section("viewer", "3D viewer", '<p class="warning" id="viewer-missing">The 3D viewer is not '
                        f"included: three.js was not found. To add it, {_e(viewer_assets.INSTALL_HINT)}.</p>")
    vendored, viewer = layout.from_report(layout.report_three), layout.from_report(layout.report_viewer)
    data = {
        "names": names,
        "glbs": {n: _url(layout.from_report(p)) for n, p in _viewer_glbs(layout, names).items()},
        "importMap": {"three": f"./{vendored}/build/three.module.js",
                      "three/addons/": f"./{vendored}/examples/jsm/",
                      "idto3d/viewer": f"./{viewer}/viewer.js"},
        "embedded": f"{viewer}/embedded.js" if embedded else None,
        "fileNote": VIEWER_FILE_NOTE,
    }
    blob = json.dumps(data).replace("</", "<\\/")
    body = f"""<div class="viewer-controls"><span>Expression:</span><span id="viewer-expressions"></span>
<label><input type="checkbox" id="viewer-env" checked disabled> studio environment light</label></div>
<canvas id="viewer-canvas"></canvas>
<p class="note" id="viewer-status">Loading the 3D viewer (three.js {_e(viewer_assets.package_version(three))})...</p>
<noscript><p class="warning">The 3D viewer needs JavaScript.</p></noscript>
<script type="application/json" id="idto3d-viewer-data">{blob}</script>
<script src="{viewer}/boot.js"></script>"""
    return _section("viewer", "3D viewer", body)


def _stage_seconds(run_dir: Path, metrics: dict) -> dict[str, float]:
    """Seconds per pipeline step (its record in the run folder) and for the evaluation, in pipeline order."""
    layout = RunLayout(run_dir)
    out: dict[str, float] = {}
    for stage, path in layout.stage_reports.items():
        data, _ = _read_json(path) if path.is_file() else (None, None)
        if data and isinstance(data.get("seconds"), (int, float)):
            out[STAGE_LABELS[stage]] = float(data["seconds"])
    timings = metrics.get("timings") if isinstance(metrics.get("timings"), dict) else {}
    evaluate = timings.get("evaluate") if isinstance(timings.get("evaluate"), dict) else {}
    if isinstance(evaluate.get("total"), (int, float)):
        out["evaluation"] = float(evaluate["total"])
    return out


def _config_section(run_dir: Path) -> str:
    path = RunLayout(run_dir).config
    if not path.is_file():
        return _section("config", "Config", f'<p class="note">No <code>{_e(path.name)}</code> in this run.</p>')
    return _section("config", "Config", f"<pre>{_e(path.read_text(encoding='utf-8'))}</pre>")


# ---------------------------------------------------------------- the page


def _viewer_glbs(layout: RunLayout, names: list[str]) -> dict[str, Path]:
    """The GLBs the viewer loads: each expression's, and the morph-target head under the key ``morph/head``."""
    glbs = {n: layout.glb(n) for n in names}
    return glbs | ({"morph/head": layout.morph_glb} if layout.morph_glb.is_file() else {})


def _install_viewer(layout: RunLayout, names: list[str], three: Path, embed_limit_bytes: int) -> bool:
    """Vendor three.js, write the viewer's scripts; returns whether the GLBs were embedded for file://."""
    vendor = layout.report_three
    if vendor.exists():
        shutil.rmtree(vendor)  # a different three.js version may have left other files
    module_files = viewer_assets.vendor_three(three, vendor)
    templates = files("idto3d.evaluate") / "templates"
    viewer_js = (templates / "viewer.js").read_text(encoding="utf-8")
    atomic_write_text(layout.report_viewer / "viewer.js", viewer_js)
    atomic_write_text(layout.report_viewer / "boot.js", (templates / "boot.js").read_text(encoding="utf-8"))
    glbs = _viewer_glbs(layout, names)
    embed = sum(p.stat().st_size for p in glbs.values()) <= embed_limit_bytes
    embedded_js = layout.report_viewer / "embedded.js"
    if embed:
        modules = {**viewer_assets.bare_sources(three, module_files), "idto3d/viewer": viewer_js}
        payload = {"modules": modules, "glbs": {n: b64encode(p.read_bytes()).decode("ascii")
                                                for n, p in glbs.items()}}
        atomic_write_text(embedded_js, "// idto3d report: three.js modules and GLBs for pages opened from "
                          "file:// (see boot.js).\nwindow.__idto3dEmbedded = " + json.dumps(payload) + ";\n")
    elif embedded_js.exists():
        embedded_js.unlink()
    return embed


def write_report(run_dir: Path, metrics: dict, *, console: Console | None = None,
                 embed_limit_bytes: int = EMBED_LIMIT_BYTES) -> Path:
    """Write ``run_dir/report/index.html`` (and the viewer's files beside it); returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise IdtoError(f"run folder {run_dir} does not exist; pass the folder `idto3d generate --out` wrote")
    if not isinstance(metrics, dict):
        raise IdtoError(f"metrics must be a dict (the contents of metrics.json), got {type(metrics).__name__}")
    console = console or Console(stderr=True)
    layout = RunLayout(run_dir)
    report_dir = layout.report
    report_dir.mkdir(parents=True, exist_ok=True)
    names = exported_expressions(run_dir)
    three = viewer_assets.find_three(console=console) if names else None
    embedded = False
    if three is not None:
        embedded = _install_viewer(layout, names, three, embed_limit_bytes)
    elif names:
        console.print(f"[yellow]warning:[/] report written without the 3D viewer: three.js was not found; "
                      f"{viewer_assets.INSTALL_HINT}", highlight=False)
    css = (files("idto3d.evaluate") / "templates" / "report.css").read_text(encoding="utf-8")
    title = f"idto3d report: {run_dir.resolve().name}"
    # Answer first (headline), then what to look at, then the plots; every raw number last, collapsed.
    sections = [headline_html(metrics, names, _stage_seconds(run_dir, metrics)),
                _viewer_section(layout, names, three, embedded), _turntables_section(run_dir),
                _plots_section(report_dir, metrics), _timings_section(run_dir, metrics), _config_section(run_dir),
                _metrics_section(metrics)]
    nav = " ".join(f'<a href="#{i}">{t}</a>' for i, t in (("headline", "Summary"), ("viewer", "3D viewer"),
                                                          ("turntables", "Turntables"), ("plots", "Plots"),
                                                          ("timings", "Timings"), ("config", "Config"),
                                                          ("metrics", "All metrics")))
    page = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{_e(title)}</title>
<style>
{css}</style>
</head>
<body>
<header><h1>{_e(title)}</h1><p>idto3d {_e(__version__)} &middot; run folder <code>{_e(run_dir.resolve())}</code></p>
<nav>{nav}</nav></header>
<main>
{''.join(sections)}</main>
</body>
</html>
"""
    return atomic_write_text(layout.report_index, page)


# ---------------------------------------------------------------- idto3d view


def ensure_report(run_dir: Path, console: Console | None = None) -> Path:
    """``report/index.html``, written first (from ``report/metrics.json`` when present) if missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise IdtoError(f"run folder {run_dir} does not exist; pass the folder `idto3d generate --out` wrote")
    layout = RunLayout(run_dir)
    if layout.report_index.is_file():
        return layout.report_index
    metrics: dict = {}
    metrics_path = layout.metrics
    if metrics_path.is_file():
        data, problem = _read_json(metrics_path)
        if data is None:
            raise IdtoError(f"{metrics_path}: {problem}; run `idto3d evaluate` again or delete it")
        metrics = data
    return write_report(run_dir, metrics, console=console)


_SERVED_FOLDERS = ("report", "export", "renders")  # the report, and the heads and turntables it shows
_LINK = re.compile(r"""(?:src|href)\s*=\s*["']([^"'#?]+)""")


class _Handler(SimpleHTTPRequestHandler):
    """Serves the report and the files it embeds, nothing else of the run folder (no identity, crops or config,
    no directory listings, no link out of the folder), and only to pages addressed to this machine's loopback
    name: a Host header naming another site (DNS rebinding) is refused."""

    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".js": "text/javascript",
                      ".mjs": "text/javascript", ".glb": "model/gltf-binary", ".json": "application/json",
                      ".mp4": "video/mp4"}

    def send_head(self):  # noqa: ANN201 (the base class's signature)
        port = self.server.server_address[1]
        if self.headers.get("Host", "") not in (f"127.0.0.1:{port}", f"localhost:{port}"):
            self.send_error(403, "this server answers only http://127.0.0.1 and http://localhost")
            return None
        if not self._allowed(Path(self.translate_path(self.path))):
            self.send_error(404, "not part of the report")
            return None
        return super().send_head()

    def _allowed(self, path: Path) -> bool:
        """A file of the report's folders, or one the page links to, that stays in the run folder once links
        are followed (both where it is asked for and where it really is)."""
        root = Path(self.directory).resolve()
        real = path.resolve()
        if not real.is_file() or not real.is_relative_to(root):
            return False
        embedded = _embedded(root)
        return all(p.is_relative_to(root) and (p in embedded or p.relative_to(root).parts[0] in _SERVED_FOLDERS)
                   for p in (real, path.parent.resolve() / path.name))

    def list_directory(self, path):  # noqa: ANN001, ANN201
        self.send_error(404, "no directory listings")
        return None

    def end_headers(self) -> None:
        # A report written again must show its new files, not the browser's cached ones.
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass


def _embedded(root: Path) -> set[Path]:
    """The run's files the report page links to outside its served folders (previews of the stages)."""
    page = RunLayout(root).report_index
    if not page.is_file():
        return set()
    links = _LINK.findall(page.read_text(encoding="utf-8", errors="replace"))
    return {(page.parent / link).resolve() for link in links if "://" not in link and not link.startswith("/")}


def serve(run_dir: Path, port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """An HTTP server for ``run_dir`` on 127.0.0.1 (not yet serving: call ``serve_forever``) and the
    report's address. ``port=0`` picks a free port."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise IdtoError(f"run folder {run_dir} does not exist; pass the folder `idto3d generate --out` wrote")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise IdtoError(f"port must be a whole number in [0, 65535] (0: any free port), got {port!r}")
    handler = functools.partial(_Handler, directory=str(run_dir.resolve()))
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as exc:
        raise IdtoError(f"cannot serve on 127.0.0.1:{port} ({exc.strerror or exc}); pick another --port, "
                        "or 0 for any free port") from None
    server.daemon_threads = True
    return server, f"http://127.0.0.1:{server.server_address[1]}/report/index.html"
