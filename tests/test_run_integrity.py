"""Run folders that never lie, never lose a user's files, and fail with one clear line (issue 16).

Each case a hostile but realistic user reported, reproduced on tiny settings: the fixed behaviour is asserted as
exit code, one ``error:`` line, no traceback, no leftovers, the user's files untouched, the right person's head.
One finished offline run of the astronaut is made once and copied for each case that changes it.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from idto3d.cli import app
from idto3d.core.config import load_config
from idto3d.core.errors import IdtoError
from idto3d.core.run_layout import RunLayout
from idto3d.core.run_lock import RunLock
from idto3d.core.run_manifest import StaleOutputError
from idto3d.core.stored_files import DamagedFileError
from idto3d.stages.run_folder import open_run, prepare_run

from geometry_stage_driver import oracle_guidance, run_geometry, sphere_field, stage_config
from identity_models import astronaut_photo, insightface_photo

runner = CliRunner()
# The smallest offline run that still fits a face, textures it and exports it.
TINY = ["template.iterations=80", "template.points_per_step=2000", "geometry.grid_resolution=24",
        "photo_texture.iterations=5", "export.texture_size=64", "export.turntable_views=2",
        "export.turntable_resolution=64", "export.video=false", "expressions=[neutral]"]
SETS = [a for s in TINY for a in ("--set", s)]


def _generate(photos: list[Path], out: Path, *extra: str):
    return runner.invoke(app, ["generate", *map(str, photos), "--out", str(out), *SETS, *extra])


def _one_error_line(result, *needles: str) -> str:
    """The single ``error:`` line of a failed command (exit 2, no traceback), checked to contain ``needles``."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.parent.name != ".idto3d"}


@pytest.fixture(scope="module")
def astronaut(tmp_path_factory) -> Path:
    return astronaut_photo(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def blank(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("blank") / "wall.png"
    Image.fromarray(np.full((256, 256, 3), 180, np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def finished(astronaut, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    result = _generate([astronaut], run)
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture
def run_a(finished, tmp_path) -> Path:
    """A copy of the finished astronaut run (mtimes kept), for a case to change."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


# ---- 1. other photos into a finished run ---------------------------------------------------------------------

def test_other_photos_into_a_finished_run_are_refused_and_change_nothing(run_a):
    before = _snapshot(run_a)
    result = _generate([insightface_photo("Tom_Hanks_54745.png")], run_a)
    _one_error_line(result, "other photos", "astronaut.png", "--overwrite", "--out")
    assert _snapshot(run_a) == before, "a refused run changed the folder (identity, face fit or outputs)"


def test_the_same_photos_resume_the_finished_run_without_rewriting_it(run_a, astronaut):
    before = _snapshot(run_a)
    result = _generate([astronaut], run_a)
    assert result.exit_code == 0, result.output
    assert _snapshot(run_a) == before


def test_a_finished_output_of_other_photos_is_refused_by_its_key(tmp_path, blank):
    from idto3d.stages.initial_geometry import ensure_init, fit_template

    cfg = load_config(None, None, ["template.iterations=80", "template.points_per_step=500",
                                   "template.build_resolution=32", "geometry.grid_resolution=16"])
    fit_template(tmp_path, cfg, progress=False)  # the template's fit: made from no photos
    with pytest.raises(StaleOutputError, match="init_report.json was made from other photos than"):
        ensure_init(tmp_path, cfg, progress=False, photos=[blank])


# ---- 2. --overwrite --------------------------------------------------------------------------------------------

def _user_files(run: Path) -> dict[Path, bytes]:
    files = {run / "export" / "thesis.docx": b"four years of work", run / "renders" / "holiday.png": b"\x89PNG..."}
    for path, data in files.items():
        path.write_bytes(data)
    return files


def test_overwrite_with_a_bad_photo_removes_nothing(run_a, blank):
    mine = _user_files(run_a)
    before = _snapshot(run_a)
    _one_error_line(_generate([blank], run_a, "--overwrite"), "no face")
    assert _snapshot(run_a) == before, "--overwrite removed files before the inputs were checked"
    assert all(p.read_bytes() == data for p, data in mine.items())


def test_overwrite_makes_the_new_person_and_keeps_the_users_files(run_a):
    mine = _user_files(run_a)
    old_glb = (run_a / "export" / "neutral.glb").read_bytes()
    old_identity = (run_a / "identity.safetensors").read_bytes()
    result = _generate([insightface_photo("Tom_Hanks_54745.png")], run_a, "--overwrite")
    assert result.exit_code == 0, result.output
    assert all(p.read_bytes() == data for p, data in mine.items()), "--overwrite removed a user's file"
    assert "thesis.docx" in result.output and "holiday.png" in result.output, "the kept files are not named"
    assert (run_a / "identity.safetensors").read_bytes() != old_identity
    assert (run_a / "export" / "neutral.glb").read_bytes() != old_glb, "the old person's head was kept"
    manifest = json.loads(RunLayout(run_a).manifest.read_text())
    assert [f["name"] for f in manifest["inputs"]["files"]] == ["Tom_Hanks_54745.png"]


# ---- 3. one command at a time ----------------------------------------------------------------------------------

def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "idto3d.cli", *args]


def test_two_generate_commands_on_one_folder_one_runs_the_other_exits_2_at_once(astronaut, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
    first = subprocess.Popen(_cli("generate", str(astronaut), "--out", str(run), *SETS), env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = RunLayout(run).lock
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run(_cli("generate", str(astronaut), "--out", str(run), *SETS), env=env,
                            capture_output=True, text=True, timeout=120)
    still_running = first.poll() is None
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert lines == [f"error: {run} is in use by another idto3d command (PID {first.pid}); wait for it to finish, "
                     f"or choose another --out"], second.stderr
    assert still_running, "the second command did not fail while the first was running"
    assert (run / "export" / "neutral.glb").exists()


def test_a_held_folder_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with RunLock(RunLayout(run).lock, run):
        result = runner.invoke(app, ["fit-template", "--out", str(run), *SETS])
    _one_error_line(result, f"PID {os.getpid()}", "in use")


# ---- 4. damaged checkpoints and stage files --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["texture/photo.pt", "texture/photo_report.json", "texture/atlas.npz",
                                  "export/done.json"])
def test_a_truncated_stage_file_is_named_in_one_line(run_a, astronaut, name):
    path = run_a / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _one_error_line(_generate([astronaut], run_a), f"{name} is damaged", "--overwrite")
    # ...and --overwrite starts that run over.
    assert _generate([astronaut], run_a, "--overwrite").exit_code == 0


def test_a_damaged_sds_checkpoint_resumes_from_the_previous_one_to_the_same_end(tmp_path):
    cfg = stage_config(["geometry.iterations=6", "geometry.checkpoint_every=2"])
    whole = run_geometry(tmp_path / "whole", cfg, oracle_guidance(cfg), sphere_field(cfg))
    run = tmp_path / "run"
    run_geometry(run, cfg, oracle_guidance(cfg), sphere_field(cfg), stop_after=4)
    files = RunLayout(run).geometry_sds
    assert torch.load(files.previous_checkpoint, weights_only=True)["iteration"] == 2
    files.checkpoint.write_bytes(files.checkpoint.read_bytes()[:1000])
    again = run_geometry(run, cfg, oracle_guidance(cfg), sphere_field(cfg))
    assert (again.resumed_from, again.iterations) == (2, 6)
    for name in whole.meshes:
        assert torch.equal(again.meshes[name].vertices, whole.meshes[name].vertices)


def test_a_damaged_sds_checkpoint_with_no_previous_one_is_named(tmp_path):
    cfg = stage_config(["geometry.iterations=4", "geometry.checkpoint_every=2"])
    run = tmp_path / "run"
    run_geometry(run, cfg, oracle_guidance(cfg), sphere_field(cfg), stop_after=2)
    files = RunLayout(run).geometry_sds
    files.previous_checkpoint.unlink(missing_ok=True)
    files.checkpoint.write_bytes(files.checkpoint.read_bytes()[:1000])
    with pytest.raises(DamagedFileError, match=r"ckpt.pt is damaged .*--overwrite"):
        run_geometry(run, cfg, oracle_guidance(cfg), sphere_field(cfg))


# ---- 6. file-system errors -------------------------------------------------------------------------------------

def test_out_below_a_file_is_one_line_and_creates_nothing(astronaut, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    _one_error_line(_generate([astronaut], tmp_path / "notes.txt" / "run"), "is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_disk_error_mid_run_is_one_line_and_leaves_no_folder(astronaut, tmp_path, monkeypatch, code):
    import idto3d.core.atomic as atomic

    real = atomic._temp_path

    def failing(path: Path) -> Path:
        if path.name == "photo.pt":  # after the identity, config.yaml and the offline head were written
            raise OSError(code, os.strerror(code), str(path))
        return real(path)

    monkeypatch.setattr(atomic, "_temp_path", failing)
    out = tmp_path / "new" / "run"
    _one_error_line(_generate([astronaut], out), os.strerror(code), "photo.pt")
    assert not (tmp_path / "new").exists(), "a failed first run left folders behind"


def test_a_leftover_config_of_a_run_that_computed_nothing_does_not_block_another_config(tmp_path):
    run = tmp_path / "run"
    run.mkdir()  # the user's folder: kept when the run fails
    prepare_run(run, load_config(None, None, TINY))
    prepare_run(run, load_config(None, None, [*TINY, "seed=1"]))  # nothing computed: not refused
    with open_run(run) as held:  # once something was computed, another config is refused
        held.begin(load_config(None, None, [*TINY, "seed=1"]), None, False)
        from idto3d.core.atomic import atomic_write_text

        atomic_write_text(RunLayout(run).init_report, "{}")
    with pytest.raises(IdtoError, match="different config"):
        prepare_run(run, load_config(None, None, TINY))


# ---- 7. idto3d view ----------------------------------------------------------------------------------------------

def test_view_serves_only_the_report_to_loopback_hosts(run_a):
    import threading

    from idto3d.evaluate.report import ensure_report, serve

    ensure_report(run_a)
    (run_a / "report" / "passwd").symlink_to("/etc/passwd")
    server, url = serve(run_a)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

    def get(path: str, host: str = f"127.0.0.1:{port}") -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", path, headers={"Host": host})
        status = conn.getresponse().status
        conn.close()
        return status

    try:
        assert get("/report/index.html") == 200
        assert get("/report/index.html", f"localhost:{port}") == 200
        assert get("/export/neutral.glb") == 200
        assert get("/report/index.html", "evil.example:80") == 403
        assert get("/report/index.html", f"evil.example:{port}") == 403
        for secret in ("/identity.safetensors", "/config.yaml", "/crops/", "/", "/report/", "/.idto3d/manifest.json",
                       "/report/passwd", "/../../etc/passwd", "/geometry/face_fit.json"):
            assert get(secret) == 404, secret
    finally:
        server.shutdown()
        server.server_close()


# ---- 8. one line whatever the terminal; Ctrl-C -----------------------------------------------------------------

def test_error_lines_are_one_line_when_stderr_is_not_a_terminal(tmp_path):
    missing = tmp_path / ("a-very-long-folder-name-" * 6) / "portrait.jpg"
    proc = subprocess.run(_cli("generate", str(missing), "--out", str(tmp_path / "run")), capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "40"})
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: photo not found: {missing}"]


def test_ctrl_c_prints_one_line_and_exits_130(astronaut, tmp_path):
    run = tmp_path / "run"
    # A test runner started in the background of a non-interactive shell ignores SIGINT, and a Python started
    # with SIGINT ignored keeps it so: the child gets the default back, as the user's terminal gives it.
    proc = subprocess.Popen(_cli("generate", str(astronaut), "--out", str(run), *SETS),
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not RunLayout(run).identity.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "interrupted; run the same command again to resume"
