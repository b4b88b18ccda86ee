"""The HTML report and its three.js viewer: local-only files, the localhost server, the no-three.js fallback,
and the viewer driven in headless Chromium (Selenium) over http and from file://."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from idto3d.core.config import dump_config, load_config
from idto3d.core.errors import IdtoError
from idto3d.evaluate import viewer_assets
from idto3d.evaluate.report import ensure_report, serve, write_report
from idto3d.export import PBRMaps, export_expression, shared_atlas
from idto3d.export.morph import write_morph_glb
from idto3d.geometry.template import build_head_template

BACKGROUND = np.array([0x2B, 0x2F, 0x36])  # viewer.js's clear colour
SCREENSHOT_COPY = Path("/tmp/idto3d_report_screenshot.png")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  # WebGL on the CPU: SwiftShader through ANGLE (newer Chromium wants the 'unsafe' opt-in).
                  "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--window-size=1280,1400"]
METRICS = {
    "format": "idto3d.metrics/1", "run": "tiny", "references": ["refs/a.jpg"], "backend": "dlib",
    "grid": {"elevations": [-15.0, 0.0, 15.0], "azimuths": [-65.0, 0.0, 65.0], "views": 9},
    "identity": {"cosine": {"mean": 0.61234, "std": 0.05, "min": 0.5, "max": 0.7, "n": 18},
                 "distance": {"mean": 0.41}, "threshold": 0.6, "faces_missed": 1,
                 "per_view": [{"elevation": 0.0, "azimuth": 0.0, "cosine": 0.7},
                              {"elevation": 15.0, "azimuth": 65.0, "cosine": 0.5}]},
    "expressions": {"neutral": {"cosine_to_neutral_front": 0.93}, "smile": {"cosine_to_neutral_front": 0.81}},
    "fid": {"texture": None, "geometry": None},
    "timings": {"render": 1.5, "embed": 2.25},
}


def _maps(rgb: tuple[float, float, float]) -> PBRMaps:
    albedo = np.broadcast_to(np.array(rgb, np.float32), (32, 32, 3)).copy()
    return PBRMaps.create(albedo, np.full((32, 32), 0.6, np.float32), np.zeros((32, 32), np.float32))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny run: config, two expressions' GLBs (red neutral, blue smile), a turntable, a plot, a stage report."""
    run = tmp_path_factory.mktemp("run")
    (run / "config.yaml").write_text(dump_config(load_config("preview")), encoding="utf-8")
    head = build_head_template(32)
    (uv,) = shared_atlas([head])
    export_expression(run / "export", "neutral", uv, _maps((0.85, 0.12, 0.1)))
    export_expression(run / "export", "smile", uv, _maps((0.1, 0.2, 0.9)))
    # The morph head: neutral (red) with a "smile" target 35 % wider, so the slider visibly changes the canvas.
    wide = uv.with_positions(head.vertices * torch.tensor([1.35, 1.0, 1.0]))
    write_morph_glb(run / "export" / "morph" / "head.glb", uv, {"smile": wide}, _maps((0.85, 0.12, 0.1)))
    (run / "renders").mkdir()
    Image.new("RGB", (48, 16), (200, 180, 170)).save(run / "renders" / "neutral_turntable.png")
    (run / "report").mkdir()
    Image.new("RGB", (40, 30), (255, 255, 255)).save(run / "report" / "similarity.png")
    (run / "geometry").mkdir()
    (run / "geometry" / "done.json").write_text(json.dumps({"iterations": 40, "seconds": 12.5}), encoding="utf-8")
    return run


@pytest.fixture(scope="module")
def three() -> Path:
    package = viewer_assets.find_three()
    if package is None:
        pytest.skip("three.js not found and not installable: " + viewer_assets.INSTALL_HINT)
    return package


@pytest.fixture(scope="module")
def report(run_dir, three) -> Path:
    t0 = time.perf_counter()
    index = write_report(run_dir, METRICS)
    print(f"write_report: {time.perf_counter() - t0:.2f} s")
    return index


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def _viewer_data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="idto3d-viewer-data">(.*?)</script>', page, re.S)
    assert m, "viewer data missing"
    return json.loads(m.group(1))


def _strip_js_comments(source: str) -> str:
    """Drop block comments and // comments after whitespace (enough for three.js's sources; URLs keep theirs
    since a colon precedes their //)."""
    source = re.sub(r"/\*.*?\*/", "", source, flags=re.S)
    return re.sub(r"(^|\s)//[^\n]*", r"\1", source, flags=re.M)


URL = re.compile(r"https?://[^\s'\"<>)]+")


def test_report_is_local_and_complete(report, run_dir):
    page = report.read_text(encoding="utf-8")
    rdir = report.parent
    # Our own page and scripts name no remote address at all.
    for path in [report, rdir / "viewer" / "boot.js", rdir / "viewer" / "viewer.js"]:
        urls = [u for u in URL.findall(path.read_text(encoding="utf-8")) if not u.startswith("http://127.0.0.1")]
        assert urls == [], f"{path.name} names remote URLs: {urls}"
    # Vendored three.js: every import is local, and outside comments only XML namespace names remain.
    vendored = {p.relative_to(rdir).as_posix(): p.read_text(encoding="utf-8")
                for p in (rdir / "vendor").rglob("*.js")}
    embedded = json.loads((rdir / "viewer" / "embedded.js").read_text(encoding="utf-8")
                          .split("window.__idto3dEmbedded = ", 1)[1].rstrip().rstrip(";"))
    vendored.update({f"embedded:{k}": v for k, v in embedded["modules"].items()})
    for name, source in vendored.items():
        code = _strip_js_comments(source)
        for spec in re.findall(r"""^\s*(?:import|export)\b[^;]*?\bfrom\s*['"]([^'"]+)['"]""", code, re.M | re.S):
            assert spec.startswith(("./", "../", "three")), f"{name} imports {spec}"
        remote = [u for u in URL.findall(code) if not u.startswith("http://www.w3.org/")]
        assert remote == [], f"{name} names remote URLs outside comments: {remote}"
    for rel in ["build/three.module.js", "build/three.core.js", "examples/jsm/loaders/GLTFLoader.js",
                "examples/jsm/controls/OrbitControls.js", "examples/jsm/environments/RoomEnvironment.js",
                "examples/jsm/utils/BufferGeometryUtils.js", "LICENSE"]:
        assert (rdir / "vendor" / "three" / rel).is_file(), rel
    assert set(embedded["glbs"]) == {"neutral", "smile", "morph/head"}  # the expressions and the morph head
    assert base64.b64decode(embedded["glbs"]["morph/head"]) == (run_dir / "export/morph/head.glb").read_bytes()
    assert base64.b64decode(embedded["glbs"]["smile"]) == (run_dir / "export" / "smile.glb").read_bytes()
    # Every local file the page references exists (links, images, scripts, import map, GLBs).
    parser = _Refs()
    parser.feed(page)
    data = _viewer_data(page)
    refs = [r for r in parser.refs if not r.startswith(("#", "data:"))]
    refs += list(data["importMap"].values()) + list(data["glbs"].values()) + [data["embedded"]]
    assert "../export/neutral.glb" in refs and "../renders/neutral_turntable.png" in refs and "similarity.png" in refs
    for ref in refs:
        assert (rdir / ref).exists(), f"{ref} is referenced but missing"
    # The sections carry the run's content.
    assert data["names"] == ["neutral", "smile"]
    assert html.escape((run_dir / "config.yaml").read_text(encoding="utf-8"), quote=True) in page
    assert "0.6123" in page and "0.81" in page and "cosine.mean" in page
    assert "geometry SDS" in page and "12.5" in page and "embed" in page


def test_serve_binds_localhost_and_serves_glb(run_dir):
    server, url = serve(run_dir)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert server.server_address[0] == "127.0.0.1"
        assert url == f"http://127.0.0.1:{server.server_address[1]}/report/index.html"
        base = url.rsplit("/report/", 1)[0]
        with urllib.request.urlopen(f"{base}/export/neutral.glb", timeout=10) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "model/gltf-binary"
            assert r.read() == (run_dir / "export" / "neutral.glb").read_bytes()
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"{base}/export/missing.glb", timeout=10)
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(IdtoError, match="does not exist"):
        serve(run_dir / "missing")


def test_report_without_three_has_note_and_no_viewer(run_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report"))
    monkeypatch.setattr(viewer_assets, "find_three", lambda **kwargs: None)
    out = io.StringIO()
    page = write_report(run, METRICS, console=Console(file=out, width=300)).read_text(encoding="utf-8")
    assert 'id="viewer-missing"' in page and "npm install" in page
    assert "<script" not in page and "<canvas" not in page
    assert not (run / "report" / "vendor").exists()
    assert "without the 3D viewer" in out.getvalue() and "IDTO3D_THREE" in out.getvalue()
    assert "0.6123" in page and "neutral_turntable.png" in page  # the rest of the report is intact


def test_ensure_report_uses_metrics_json_or_nothing(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(viewer_assets, "find_three", lambda **kwargs: None)
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report"))
    page = ensure_report(run, console=Console(file=io.StringIO())).read_text(encoding="utf-8")
    assert "No metrics yet" in page
    (run / "report" / "index.html").unlink()
    (run / "report" / "metrics.json").write_text(json.dumps(METRICS), encoding="utf-8")
    assert "0.6123" in ensure_report(run, console=Console(file=io.StringIO())).read_text(encoding="utf-8")
    (run / "report" / "index.html").unlink()
    (run / "report" / "metrics.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(IdtoError, match="metrics.json"):
        ensure_report(run)


# ---------------------------------------------------------------- headless Chromium


def _chrome():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    binary = next((p for p in ["/usr/bin/chromium", shutil.which("chromium")] if p and Path(p).exists()), None)
    driver_exe = next((p for p in ["/usr/bin/chromedriver", shutil.which("chromedriver")] if p and Path(p).exists()),
                      None)
    if binary is None or driver_exe is None:
        pytest.skip("chromium/chromedriver not installed (Debian: apt-get install chromium chromium-driver; "
                    ".ci/run does it)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tempfile.mkdtemp(prefix='idto3d-chromium-')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Both paths given: Selenium Manager has nothing to look up or download.
    return webdriver.Chrome(service=Service(executable_path=driver_exe), options=options)


def _wait_ready(driver) -> dict:
    driver.set_script_timeout(60)
    return driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "const poll = () => window.idto3dViewer ? window.idto3dViewer.ready.then("
        "  v => done({ok: true, names: v.names, expression: v.expression, environment: v.environment}),"
        "  e => done({ok: false, error: String(e)})) : setTimeout(poll, 50);"
        "poll();")


def _canvas(driver) -> np.ndarray:
    url = driver.execute_script("return document.getElementById('viewer-canvas').toDataURL('image/png');")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")).astype(float)


def _call(driver, js: str):
    return driver.execute_async_script(
        f"const done = arguments[arguments.length - 1]; Promise.resolve({js}).then(done, e => done('error: ' + e));")


def _head(img: np.ndarray) -> np.ndarray:
    """Pixels that are not the viewer's background."""
    return np.abs(img - BACKGROUND).max(axis=-1) > 8


@pytest.mark.slow
def test_viewer_renders_and_switches_in_headless_chromium(report, run_dir, tmp_path):
    t0 = time.perf_counter()
    driver = _chrome()
    server, url = serve(run_dir)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        driver.get(url)
        state = _wait_ready(driver)
        assert state == {"ok": True, "names": ["neutral", "smile"], "expression": "neutral", "environment": True}
        red = _canvas(driver)
        head = _head(red)
        assert 0.05 < head.mean() < 0.95, f"head covers {head.mean():.1%} of the canvas"
        r, g, b = red[head].mean(axis=0)
        assert r > b + 40, (r, g, b)

        assert _call(driver, "window.idto3dViewer.setExpression('smile')") == "smile"
        blue = _canvas(driver)
        r2, g2, b2 = blue[_head(blue)].mean(axis=0)
        assert b2 > r2 + 40, (r2, g2, b2)
        assert np.abs(blue - red).mean() > 5

        assert _call(driver, "window.idto3dViewer.setEnvironment(false)") is False
        plain = _canvas(driver)
        assert np.abs(plain - blue)[_head(blue)].mean() > 5, "environment toggle left the image unchanged"
        assert _call(driver, "window.idto3dViewer.setEnvironment(true)") is True
        assert np.abs(_canvas(driver) - blue).max() <= 2  # on demand rendering: same state, same pixels

        # The expression buttons drive the same hook.
        driver.find_element("css selector", "#viewer-expressions button[data-expression='neutral']").click()
        deadline = time.time() + 10
        while driver.execute_script("return window.idto3dViewer.expression") != "neutral" and time.time() < deadline:
            time.sleep(0.05)
        neutral = _canvas(driver)
        assert _head(neutral).mean() > 0.05

        # The morph head's slider: at 0 it is the neutral head (same pixels), at 1 the wider smile target.
        assert _call(driver, "window.idto3dViewer.morphTargets") == ["smile"]
        assert _call(driver, "window.idto3dViewer.setMorph('smile', 0)") == 0
        assert np.abs(_canvas(driver) - neutral).max() <= 2
        slide = ("const s = document.querySelector('#viewer-morphs input[data-target=smile]'); s.value = '1';"
                 "s.dispatchEvent(new Event('input')); return s.value;")
        assert driver.execute_script(slide) == "1"
        deadline = time.time() + 10
        while _call(driver, "window.idto3dViewer.expression") != "morph" and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        wide = _canvas(driver)
        assert np.abs(wide - neutral).mean() > 1 and _head(wide).mean() > 1.15 * _head(neutral).mean()
        assert _call(driver, "window.idto3dViewer.setMorph('smile', 0)") == 0
        assert np.abs(_canvas(driver) - neutral).max() <= 2
        assert _call(driver, "window.idto3dViewer.setExpression('neutral')") == "neutral"

        shot = tmp_path / "report_screenshot.png"
        driver.find_element("id", "viewer").screenshot(str(shot))
        shutil.copyfile(shot, SCREENSHOT_COPY)
        print(f"screenshot: {shot} (copied to {SCREENSHOT_COPY})")
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == [], severe

        # Straight from disk, no server: modules and GLBs come from viewer/embedded.js.
        driver.get(report.as_uri())
        state = _wait_ready(driver)
        assert state["ok"] and state["expression"] == "neutral", state
        assert 0.05 < _head(_canvas(driver)).mean() < 0.95
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == [], severe
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()
    print(f"browser test: {time.perf_counter() - t0:.1f} s")


# ---------------------------------------------------------------- the headline (answer first)

HEADLINE_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "report_headline.png"


def _bare_run(tmp_path: Path) -> Path:
    """A run folder with a config and two step records, no exports (no viewer needed)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(load_config("preview")), encoding="utf-8")
    (run / "geometry").mkdir()
    (run / "geometry" / "done.json").write_text(json.dumps({"iterations": 40, "seconds": 75.0}), encoding="utf-8")
    (run / "report").mkdir()
    for name in ("similarity.png", "tsne.png"):
        Image.new("RGB", (40, 30), (255, 255, 255)).save(run / "report" / name)
    return run


def _metrics(distance: float, threshold: float, refs: int = 1) -> dict:
    m = json.loads(json.dumps(METRICS))
    m["references"] = [f"refs/{i}.jpg" for i in range(refs)]
    m["identity"].update({"distance": {"mean": distance}, "threshold": threshold, "renders": 18,
                          "faces_missed": 3, "same_person_rate": 0.8,
                          "per_expression": {"neutral": {"cosine": {"mean": 0.6}}}})
    m["timings"] = {"evaluate": {"total": 4.5}}
    m["files"] = {"comparison": None}
    return m


def _main_sections(page: str) -> list[str]:
    main = page.split("<main>", 1)[1]
    return re.findall(r'<section id="([^"]+)"', main)


@pytest.mark.parametrize("distance,threshold,same", [(0.34, 0.40, True), (0.47, 0.40, False), (0.9, 1.15, True),
                                                      (1.2, 1.15, False)])
def test_headline_is_first_and_its_verdict_matches_the_numbers(tmp_path, distance, threshold, same):
    run = _bare_run(tmp_path)
    page = write_report(run, _metrics(distance, threshold)).read_text(encoding="utf-8")
    assert _main_sections(page)[0] == "headline"
    verdict = html.unescape(re.search(r'<p class="verdict [a-z]+" id="verdict">(.*?)</p>', page).group(1))
    op = "<" if same else "≥"
    words = "Likely the same person" if same else "Likely not the same person"
    assert verdict == f"{words}: distance {distance:.2f} {op} {threshold:.2f} (dlib)"
    headline = page.split('<section id="headline">', 1)[1].split("</section>", 1)[0]
    assert "80% of the 15 views with a face are under the threshold" in headline
    assert "3 of 18 views without a face" in headline
    assert "Expressions:</b> none exported yet" in headline
    # Time taken: the geometry record (75 s) + the evaluation (4.5 s).
    assert "Time taken:</b> 1 min 20 s" in headline and "geometry SDS 1 min 15 s" in headline


def test_page_order_and_raw_metrics_collapsed(tmp_path):
    run = _bare_run(tmp_path)
    page = write_report(run, _metrics(0.3, 0.4)).read_text(encoding="utf-8")
    assert _main_sections(page) == ["headline", "viewer", "turntables", "plots", "timings", "config", "metrics"]
    raw = page.split('<details id="raw-metrics">', 1)
    assert len(raw) == 2, "raw metrics are not collapsed"
    collapsed = raw[1].split("</section>", 1)[0]
    # The flat per-expression keys and the per-view table are only inside the <details>.
    assert "per_expression.neutral.cosine.mean" in collapsed and "per_expression" not in raw[0]
    assert "<h3>Per view</h3>" in collapsed and "<h3>Per view</h3>" not in raw[0]
    # Wide tables scroll inside their own box.
    assert not re.search(r"(?<!<div class=\"scroll\">)<table>", page)


def test_tsne_only_for_several_runs_or_references(tmp_path):
    run = _bare_run(tmp_path)
    single = write_report(run, _metrics(0.3, 0.4, refs=1)).read_text(encoding="utf-8")
    assert 'src="tsne.png"' not in single and 'id="tsne-absent"' in single
    assert 'src="similarity.png"' in single
    several = write_report(run, _metrics(0.3, 0.4, refs=3)).read_text(encoding="utf-8")
    assert 'src="tsne.png"' in several and "tsne-absent" not in several
    runs = _metrics(0.3, 0.4, refs=1)
    runs["files"]["comparison"] = "report/comparison.png"
    assert 'src="tsne.png"' in write_report(run, runs).read_text(encoding="utf-8")


@pytest.mark.slow
def test_report_has_no_horizontal_overflow_at_1024px(report, run_dir, tmp_path):
    """The full report (viewer, wide per-view table, long paths) fits 1024 px; screenshots the headline."""
    wide = _metrics(0.34, 0.40)
    wide["identity"]["per_view"] = [{f"column_{i}": f"a-long-value-{i}-" * 3 for i in range(14)}] * 3
    wide["run"] = "/" + "very-long-folder-name/" * 12
    index = write_report(run_dir, wide)
    driver = _chrome()
    try:
        driver.set_window_size(1024, 900)
        driver.get(index.as_uri())
        width = driver.execute_script("return [document.documentElement.scrollWidth, "
                                      "document.documentElement.clientWidth];")
        assert width[0] <= width[1], f"page scrolls sideways at 1024 px: {width}"
        driver.execute_script("document.getElementById('raw-metrics').open = true;")
        width = driver.execute_script("return [document.documentElement.scrollWidth, "
                                      "document.documentElement.clientWidth];")
        assert width[0] <= width[1], f"opened raw metrics scroll the page sideways: {width}"
        png = driver.find_element("id", "headline").screenshot_as_png
    finally:
        driver.quit()
        write_report(run_dir, METRICS)  # the module's other tests expect their page
    shot = Image.open(io.BytesIO(png)).convert("RGB")
    assert shot.width > 300 and shot.height > 60
    out = tmp_path / "report_headline.png"
    shot.quantize(64).save(out, optimize=True)
    shutil.copy(out, SCREENSHOT_COPY.with_name("idto3d_report_headline.png"))
    assert out.stat().st_size < 150_000
