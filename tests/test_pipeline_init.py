"""The initialisation step as a run folder: config first, outputs, reuse, refusal of a different config."""

import json

import pytest
import yaml

from idto3d.core.errors import IdtoError
from idto3d.stages.template_init import run_template_fit

FAST = ["template.iterations=5", "template.points_per_step=500", "template.build_resolution=32",
        "geometry.grid_resolution=16", "expressions=[neutral, smile]"]


def test_run_folder_holds_config_meshes_and_report(tmp_path):
    report = run_template_fit(tmp_path, overrides=FAST, show_progress=False)
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert cfg["expressions"] == ["neutral", "smile"] and cfg["geometry"]["grid_resolution"] == 16
    for name in ("init.pt", "init_neutral.ply", "init_smile.ply", "init_report.json", "init_preview.png"):
        assert (tmp_path / "geometry" / name).stat().st_size > 0
    stored = json.loads((tmp_path / "geometry" / "init_report.json").read_text())
    assert stored["chamfer"] == report.chamfer and len(report.losses) == 5
    assert not list(tmp_path.rglob("*.tmp*")), "temp files left behind"


def test_same_command_reuses_a_finished_run(tmp_path):
    first = run_template_fit(tmp_path, overrides=FAST, show_progress=False)
    mtime = (tmp_path / "geometry" / "init.pt").stat().st_mtime_ns
    again = run_template_fit(tmp_path, overrides=FAST, show_progress=False)
    assert again.chamfer == first.chamfer
    assert (tmp_path / "geometry" / "init.pt").stat().st_mtime_ns == mtime


def test_different_config_is_refused_unless_overwrite(tmp_path):
    run_template_fit(tmp_path, overrides=FAST, show_progress=False)
    with pytest.raises(IdtoError, match="different config.*--overwrite"):
        run_template_fit(tmp_path, overrides=FAST + ["seed=1"], show_progress=False)
    run_template_fit(tmp_path, overrides=FAST + ["seed=1"], show_progress=False, overwrite=True)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["seed"] == 1


def test_fit_is_deterministic_under_a_seed(tmp_path):
    a = run_template_fit(tmp_path / "a", overrides=FAST, show_progress=False)
    b = run_template_fit(tmp_path / "b", overrides=FAST, show_progress=False)
    assert a.losses == b.losses and a.chamfer == b.chamfer
