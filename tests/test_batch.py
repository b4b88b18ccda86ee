"""``idto3d batch`` on a local Ray with 2 CPUs: a manifest checked before any compute, one ``generate`` task per
identity, a row with a bad photo failing alone, a re-run reusing finished identities, a killed worker retried and
resumed to the same result, and a custom resource limiting how many identities run at once."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from idto3d.cli import app

from identity_models import insightface_photo

ray = pytest.importorskip("ray")

# The preview preset cut to seconds per identity (one expression, a small grid, a few steps).
TINY = ["template.iterations=40", "template.points_per_step=4000", "geometry.grid_resolution=32",
        "photo_texture.iterations=15", "photo_texture.resolution=128", "texture.resolution=128",
        "export.texture_size=128", "export.turntable_views=2", "export.turntable_resolution=64",
        "export.video=false"]
STAND_IN_GPU = "stand_in_gpu"  # a custom resource: what --gpus-per-run declares on a machine with GPUs


def _sets() -> list[str]:
    return [a for s in TINY for a in ("--set", s)]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray (2 CPUs, 1 stand-in GPU) for the module: starting it costs seconds."""
    ray.init(num_cpus=2, include_dashboard=False, resources={STAND_IN_GPU: 1}, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(np.full((256, 256, 3), 180, np.uint8)).save(folder / "wall.png")  # no face
    return folder


def _write_manifest(path: Path, rows: list[tuple[str, str]]) -> Path:
    lines = ["name,photos,expressions"] + [f"{name},{photo},neutral" for name, photo in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def first_batch(local_ray, photos, tmp_path_factory):
    """Three identities, one of them a photo of a wall: (CLI result, OUT)."""
    out = tmp_path_factory.mktemp("batch") / "runs"
    manifest = _write_manifest(photos / "people.csv", [("anna", "astronaut.png"),
                                                       ("tom", str(insightface_photo("Tom_Hanks_54745.png"))),
                                                       ("wall", "wall.png")])
    result = CliRunner().invoke(app, ["batch", str(manifest), "--out", str(out), *_sets()])
    return result, out, manifest


def _rows(out: Path) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads((out / "batch.json").read_text())["rows"]}


def _files(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_bad_photo_fails_its_row_alone(first_batch):
    import trimesh

    result, out, _ = first_batch
    assert result.exit_code == 1, result.output
    rows = _rows(out)
    assert rows["anna"]["status"] == rows["tom"]["status"] == "done"
    for name in ("anna", "tom"):
        head = trimesh.load(out / name / "export" / "neutral.glb", force="mesh")
        assert len(head.faces) > 1000  # a head, exported (export/ has its own GLB checks)
        assert rows[name]["exported"] == 1 and rows[name]["turntable"] == f"{name}/renders/neutral_turntable.png"
        assert set(rows[name]["stage_seconds"]) == {"photo_texture"}  # offline: no field regression
        assert rows[name]["resources"] == {"CPU": 1.0}
    # generate's own one-line message (a user error, not a crash: Ray ran it once)
    assert rows["wall"]["status"] == "failed" and rows["wall"]["attempts"] == 1
    assert re.match(r"/\S+/wall\.png: no face found", rows["wall"]["error"]), rows["wall"]["error"]
    assert "wall: failed - " in result.output and "no face found" in result.output
    assert not (out / "wall").exists() and rows["wall"]["report"] is None  # nothing computed, no folder left
    page = (out / "batch.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and 'href="anna/"' in page


@pytest.mark.slow
def test_running_the_same_batch_again_reuses_every_finished_identity(first_batch):
    _, out, manifest = first_batch
    before = {name: _files(out / name) for name in ("anna", "tom")}
    again = CliRunner().invoke(app, ["batch", str(manifest), "--out", str(out), *_sets()])
    assert again.exit_code == 1  # the wall still has no face
    assert "2 of 3 identities already finished" in again.output
    rows = _rows(out)
    assert rows["anna"]["skipped"] and rows["tom"]["skipped"] and rows["anna"]["attempts"] == 0
    for name in ("anna", "tom"):
        after = _files(out / name)
        changed = [f for f in before[name] if after.get(f) != before[name][f]]
        assert after.keys() == before[name].keys() and not changed, f"{name}: re-run rewrote {changed}"


def _wait_for(what, timeout: float = 300.0, every: float = 0.05):
    end = time.time() + timeout
    while time.time() < end:
        value = what()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


def _overlap(a: list, b: list) -> bool:
    return a[0] < b[1] and b[0] < a[1]


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_resumes_to_the_same_result(first_batch, photos):
    """SIGKILL the worker running an identity once its run folder has a checkpoint: Ray retries the task, the
    retry reuses the checkpoint, and the head is byte for byte the one an uninterrupted run made. The identities
    each hold the one stand-in GPU, so they never run at once."""
    from idto3d.batch.engine import BatchSettings, run_batch
    from idto3d.batch.manifest import BatchOptions, read_manifest
    from idto3d.core.run_layout import RunLayout

    _, first_out, _ = first_batch
    out = first_out.parent / "killed"
    opts = BatchOptions(overrides=tuple(TINY))
    rows = read_manifest(_write_manifest(photos / "again.csv", [("anna", "astronaut.png"), ("wall", "wall.png")]),
                         opts).rows
    settings = BatchSettings(resources={STAND_IN_GPU: 1.0}, max_retries=2)
    log, done = io.StringIO(), {}
    driver = threading.Thread(target=lambda: done.setdefault("records", run_batch(
        rows, out, settings, opts, console=Console(file=log, width=200))))
    driver.start()
    layout = RunLayout(out / "anna")
    _wait_for(lambda: layout.atlas.exists())  # the offline head is saved (its atlas last)
    running = _wait_for(lambda: (out / "batch.json").exists() and _rows(out)["anna"]["pid"] and _rows(out))
    kept = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (layout.atlas, layout.head_landmarks)}
    killed_at = time.time()
    os.kill(running["anna"]["pid"], signal.SIGKILL)
    driver.join(timeout=600)
    assert not driver.is_alive() and "records" in done, log.getvalue()

    rows = _rows(out)
    assert rows["anna"]["status"] == "done" and rows["anna"]["attempts"] == 2, log.getvalue()
    assert rows["wall"]["status"] == "failed"
    # The retry resumed: the checkpoint the killed worker wrote was reused, not recomputed.
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in kept} == kept
    uninterrupted = {f: b for f, (_, b) in _files(first_out / "anna" / "export").items()}
    resumed = {f: b for f, (_, b) in _files(layout.export).items()}
    assert resumed.keys() == uninterrupted.keys() and resumed == uninterrupted
    assert _files(layout.renders).keys() == _files(first_out / "anna" / "renders").keys()
    for f, (_, b) in _files(layout.renders).items():
        assert b == (first_out / "anna" / "renders" / f).read_bytes(), f
    # --resources stand_in_gpu=1 with one on the node: one identity at a time, each holding it.
    assert rows["anna"]["resources"] == rows["wall"]["resources"] == {"CPU": 1.0, STAND_IN_GPU: 1.0}
    anna = [[s, e if e is not None else killed_at] for s, e in rows["anna"]["intervals"]]
    assert not any(_overlap(a, w) for a in anna for w in rows["wall"]["intervals"]), rows


def test_the_whole_manifest_is_checked_before_any_compute(tmp_path, photos):
    (tmp_path / "a.jpg").write_bytes(b"")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"""
- {{name: anna, photos: {photos / 'astronaut.png'}}}
- {{name: Anna, photos: [{photos / 'astronaut.png'}]}}
- {{name: bob, photoz: x.png}}
- {{name: cy, photos: 'nowhere/*.jpg'}}
- {{name: dan, photos: missing.png}}
- {{name: eve, photos: a.jpg, set: {{template.iterations: -1}}}}
- {{name: fay, identity: fay.safetensors}}
- {{name: ../up, photos: {photos / 'astronaut.png'}}}
""")
    out = tmp_path / "runs"
    result = CliRunner().invoke(app, ["batch", str(manifest), "--out", str(out)], env={"COLUMNS": "250"})
    assert result.exit_code == 2, result.output
    for where, text in [("item 2", "duplicate name"), ("item 3", "did you mean 'photos'"),
                        ("item 4", "no file matches nowhere/*.jpg"), ("item 5", "photo not found"),
                        ("item 6", "empty file"), ("item 7", "identity file not found"), ("item 8", "name '../up'")]:
        line = next((ln for ln in result.output.splitlines() if where in ln), "")
        assert text in line, (where, result.output)
    assert "│ item 1 " not in result.output  # the good row is not listed
    assert result.output.strip().splitlines()[-1].startswith("error: 7 bad row(s)")
    assert not out.exists()


def test_csv_and_yaml_manifests_read_the_same(tmp_path, photos):
    from idto3d.batch.manifest import BatchOptions, read_manifest

    (photos / "set").mkdir(exist_ok=True)
    Image.open(photos / "astronaut.png").save(photos / "set" / "b.png")
    csv = tmp_path / "m.csv"
    csv.write_text("name,photos,prompt,expressions,preset,set\n"
                   f"anna,{photos / 'astronaut.png'};{photos / 'set'},a woman,\"neutral,smile\",,"
                   "template.iterations=7;seed=3\n"
                   f"bob,{photos}/*.png,,neutral;smile,preview,\n")
    yml = tmp_path / "m.yaml"
    yml.write_text(f"identities:\n"
                   f"  - name: anna\n    photos: [{photos / 'astronaut.png'}, {photos / 'set'}]\n"
                   f"    prompt: a woman\n    expressions: [neutral, smile]\n"
                   f"    set: {{template.iterations: 7, seed: 3}}\n"
                   f"  - name: bob\n    photos: '{photos}/*.png'\n    expressions: neutral,smile\n"
                   f"    preset: preview\n")
    a, b = read_manifest(csv, BatchOptions()), read_manifest(yml, BatchOptions())
    assert not a.problems and not b.problems
    def key(m):
        return [(r.name, r.inputs, r.prompt, r.cfg) for r in m.rows]

    assert key(a) == key(b)
    anna, bob = a.rows
    assert anna.cfg.template.iterations == 7 and anna.cfg.seed == 3 and anna.cfg.expressions == ["neutral", "smile"]
    assert anna.inputs == ((photos / "astronaut.png").resolve(), (photos / "set").resolve())
    assert bob.inputs == ((photos / "astronaut.png").resolve(), (photos / "wall.png").resolve())
    assert bob.cfg.template.iterations != 7 and anna.prompt == "a woman" and bob.prompt is None


def test_without_ray_batch_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # ``import ray`` now raises ImportError
    result = CliRunner().invoke(app, ["batch", str(tmp_path / "m.csv"), "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "pip install 'idto3d[batch]'" in lines[0]


def test_a_run_no_node_can_hold_is_refused_before_submitting(local_ray, tmp_path, photos):
    manifest = _write_manifest(tmp_path / "m.csv", [("anna", str(photos / "astronaut.png"))])
    result = CliRunner().invoke(app, ["batch", str(manifest), "--out", str(tmp_path / "runs"),
                                      "--gpus-per-run", "1"], env={"COLUMNS": "250"})
    assert result.exit_code == 2, result.output
    assert "no Ray node has what one run asks for (CPU 1, GPU 1)" in result.output
    assert not (tmp_path / "runs" / "anna").exists()


def test_progress_lines_and_eta():
    from idto3d.batch.live import BatchView, eta_seconds

    assert eta_seconds(100.0, 0, 4, now=130.0) is None          # nothing finished yet: no rate
    assert eta_seconds(100.0, 2, 4, now=130.0) == pytest.approx(60.0)  # 15 s per identity, 4 left
    log = io.StringIO()
    with BatchView(Console(file=log, width=200), total=3) as view:  # not a terminal: plain lines
        view.update(0, 2, 0, None)
        view.update(0, 2, 0, None)                               # no change: no line
        view.update(1, 1, 1, 75.0)
    lines = log.getvalue().splitlines()
    assert lines == ["batch: 0/3 finished, done 0  running 2  failed 0  ETA --:--",
                     "batch: 2/3 finished, done 1  running 1  failed 1  ETA 1:15"]
    term = io.StringIO()
    with BatchView(Console(file=term, width=200, force_terminal=True), total=3) as view:  # a live bar
        view.update(1, 1, 1, 75.0)
    assert "2/3" in term.getvalue() and "done 1  running 1  failed 1  ETA 1:15" in term.getvalue()


def test_the_front_identity_distance_comes_from_the_reference_view():
    from idto3d.batch.results import front_identity_distance

    views = [{"expression": "smile", "elevation": 0.0, "azimuth": 0.0, "distance": 0.9},
             {"expression": "neutral", "elevation": 15.0, "azimuth": 0.0, "distance": 0.8},
             {"expression": "neutral", "elevation": 0.0, "azimuth": 0.0, "distance": 0.31}]
    metrics = {"reference_view": {"expression": "neutral", "elevation": 0.0, "azimuth": 0.0},
               "identity": {"per_view": views}}
    assert front_identity_distance(metrics) == 0.31
    assert front_identity_distance({}) is None


def test_a_row_resolves_its_config_as_generate_does(tmp_path, photos):
    from idto3d.batch.manifest import BatchOptions, read_manifest
    from idto3d.core.errors import IdtoError
    from idto3d.face_model.offline_expressions import DEFAULT_OFFLINE_EXPRESSIONS
    from idto3d.stages.generate_config import generate_config

    manifest = tmp_path / "m.csv"
    manifest.write_text(f"name,photos\nanna,{photos / 'astronaut.png'}\n")
    row = read_manifest(manifest, BatchOptions(overrides=("seed=5",))).rows[0]
    # no priors and no expressions: the face model's expressions, as `idto3d generate` makes
    assert row.cfg == generate_config(None, None, ["seed=5"])
    assert row.cfg.expressions == list(DEFAULT_OFFLINE_EXPRESSIONS) and row.cfg.seed == 5
    with_prior = read_manifest(manifest, BatchOptions(normal_prior="priors/normal")).rows[0]
    assert with_prior.cfg.expressions == ["neutral"]
    with pytest.raises(IdtoError, match="at least one name"):
        generate_config(expressions=" , ")


@pytest.mark.slow
def test_evaluate_measures_each_identity_against_its_own_photos(local_ray, tmp_path, photos):
    """``--evaluate``: each exported run is evaluated against its row's photos (the batch page shows the
    identity distance); a re-run keeps the evaluation; a finished run is evaluated without generating again."""
    from idto3d.core.run_layout import RunLayout

    manifest = _write_manifest(tmp_path / "m.csv", [("anna", str(photos / "astronaut.png"))])
    out = tmp_path / "runs"
    plain = CliRunner().invoke(app, ["batch", str(manifest), "--out", str(out), *_sets()])
    assert plain.exit_code == 0, plain.output
    assert not RunLayout(out / "anna").metrics.exists() and _rows(out)["anna"]["evaluation"] is None
    exported = _files(out / "anna" / "export")
    result = CliRunner().invoke(app, ["batch", str(manifest), "--out", str(out), "--evaluate", *_sets()])
    assert result.exit_code == 0, result.output
    row = _rows(out)["anna"]
    assert row["evaluation"] == "done" and not row["skipped"]
    metrics = json.loads(RunLayout(out / "anna").metrics.read_text())
    assert [Path(r).name for r in metrics["references"]] == ["astronaut.png"]
    assert row["identity_distance"] == pytest.approx(
        next(v["distance"] for v in metrics["identity"]["per_view"]
             if v["expression"] == "neutral" and v["elevation"] == 0 and v["azimuth"] == 0))
    assert row["same_person_rate"] == metrics["identity"]["same_person_rate"]
    assert _files(out / "anna" / "export") == exported  # evaluated, not generated again
    assert "% of views same person" in (out / "batch.html").read_text()
    again = CliRunner().invoke(app, ["batch", str(manifest), "--out", str(out), "--evaluate", *_sets()])
    assert again.exit_code == 0 and _rows(out)["anna"]["skipped"] and _rows(out)["anna"]["evaluation"] == "kept"
    # An evaluation against other photos (a user's own `idto3d evaluate -r ...`) is not this row's: done again.
    path = RunLayout(out / "anna").metrics
    path.write_text(json.dumps({**json.loads(path.read_text()), "references": [str(photos / "wall.png")]}))
    other = CliRunner().invoke(app, ["batch", str(manifest), "--out", str(out), "--evaluate", *_sets()])
    assert other.exit_code == 0 and _rows(out)["anna"]["evaluation"] == "done"
    assert [Path(r).name for r in json.loads(path.read_text())["references"]] == ["astronaut.png"]
