"""The initialisation step as a run folder: config first, outputs, reuse, refusal of a different config; one
initial field whichever command (``fit-template`` or ``generate``) fits it."""

import json

import pytest
import torch
import yaml

from idto3d.core.config import load_config
from idto3d.core.errors import IdtoError
from idto3d.stages.initial_geometry import ensure_init, fit_template
from idto3d.core.atomic import atomic_write_bytes
from idto3d.stages.run_folder import open_run, prepare_run

# 80 steps: the fewest at which both expressions have a surface (a fit with none is an error, never saved).
FAST = ["template.iterations=80", "template.points_per_step=500", "template.build_resolution=32",
        "geometry.grid_resolution=16", "expressions=[neutral, smile]"]


def _fit(run, extra=(), **kw):
    """``idto3d fit-template`` with ``FAST`` (+ ``extra``) on the preview preset."""
    return fit_template(run, load_config(None, None, FAST + list(extra)), progress=False, **kw)


def test_run_folder_holds_config_meshes_and_report(tmp_path):
    report = _fit(tmp_path)
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert cfg["expressions"] == ["neutral", "smile"] and cfg["geometry"]["grid_resolution"] == 16
    for name in ("init.pt", "init_neutral.ply", "init_smile.ply", "init_report.json", "init_preview.png"):
        assert (tmp_path / "geometry" / name).stat().st_size > 0
    stored = json.loads((tmp_path / "geometry" / "init_report.json").read_text())
    assert stored["chamfer"] == report.chamfer and len(report.losses) == 80
    assert not list(tmp_path.rglob("*.tmp*")), "temp files left behind"


def test_same_command_reuses_a_finished_run(tmp_path):
    first = _fit(tmp_path)
    mtime = (tmp_path / "geometry" / "init.pt").stat().st_mtime_ns
    again = _fit(tmp_path)
    assert again.chamfer == first.chamfer
    assert (tmp_path / "geometry" / "init.pt").stat().st_mtime_ns == mtime


def test_different_config_is_refused_unless_overwrite(tmp_path):
    _fit(tmp_path)
    with pytest.raises(IdtoError, match="different config.*--overwrite"):
        _fit(tmp_path, ["seed=1"])
    stale = tmp_path / "geometry" / "ckpt.pt"  # e.g. a geometry stage of the old config, written by idto3d
    with open_run(tmp_path):
        atomic_write_bytes(stale, b"old")
    _fit(tmp_path, ["seed=1"], overwrite=True)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["seed"] == 1
    assert not stale.exists()  # started over: nothing of the old config is left to resume


def test_fit_is_deterministic_under_a_seed(tmp_path):
    a = _fit(tmp_path / "a")
    b = _fit(tmp_path / "b")
    assert a.losses == b.losses and a.chamfer == b.chamfer


def test_fit_template_and_generate_make_and_reuse_the_same_initial_field(tmp_path):
    cfg = load_config(None, None, FAST)
    fit_template(tmp_path / "cli", cfg, progress=False)
    prepare_run(tmp_path / "gen", cfg)
    fitted = ensure_init(tmp_path / "gen", cfg, progress=False)  # what generate does
    a = torch.load(tmp_path / "cli" / "geometry" / "init.pt", weights_only=True)
    b = torch.load(tmp_path / "gen" / "geometry" / "init.pt", weights_only=True)
    assert a["expressions"] == b["expressions"] == ["neutral", "smile"]
    assert a["field"].keys() == b["field"].keys() and all(torch.equal(a["field"][k], b["field"][k]) for k in a["field"])
    # generate on a folder fit by fit-template reloads its field instead of fitting again.
    mtime = (tmp_path / "cli" / "geometry" / "init.pt").stat().st_mtime_ns
    reloaded = ensure_init(tmp_path / "cli", cfg, progress=False,
                           targets=lambda: pytest.fail("the fit ran again on a finished folder"))
    assert (tmp_path / "cli" / "geometry" / "init.pt").stat().st_mtime_ns == mtime
    for (k, x), y in zip(fitted.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(x, y), k
