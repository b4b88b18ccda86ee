"""The miniature experiment's controls (README "Miniature experiment", issue 21): face-centred cameras
(``render.camera.target``), the geometry timestep schedule as config keys, the oracle control run
(examples/miniature_oracle.py) and the signal measurement (examples/miniature_signal.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from idto3d.cli.app import app
from idto3d.core.config import CameraConfig, load_config
from idto3d.priors.guidance import SCHEDULES
from idto3d.render.camera import orbit_camera, sample_orbit_cameras
from idto3d.stages.geometry_stage import geometry_schedule
from idto3d.stages.sds_runner import draw_views

EXAMPLES = Path(__file__).parents[1] / "examples"
FACE = ["render.camera.target=[0.0, -0.15, 0.25]", "render.camera.fov_deg=[18.0, 22.0]"]


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ndc(cams, point) -> torch.Tensor:
    clip = cams.project(torch.tensor([point], dtype=torch.float32))
    return clip[..., :2] / clip[..., 3:]


def test_cameras_orbit_and_look_at_the_target():
    target = (0.1, -0.2, 0.3)
    cams = orbit_camera([0.0, 20.0, -10.0], [0.0, 35.0, -80.0], 3.0, 20.0, target=target)
    torch.testing.assert_close(_ndc(cams, target), torch.zeros(3, 1, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close((cams.eye - torch.tensor(target)).norm(dim=-1), torch.full((3,), 3.0))
    # The default is the origin, as before the key existed.
    torch.testing.assert_close(_ndc(orbit_camera(10.0, 30.0, 3.0, 40.0), (0.0, 0.0, 0.0)), torch.zeros(1, 1, 2),
                               atol=1e-5, rtol=0)
    drawn = sample_orbit_cameras(4, (-10, 30), (-45, 45), (2.8, 3.2), (18, 22), torch.Generator().manual_seed(0),
                                 target=target)
    torch.testing.assert_close(_ndc(drawn, target), torch.zeros(4, 1, 2), atol=1e-5, rtol=0)


def test_sds_and_render_dataset_cameras_follow_the_config_target():
    from idto3d.priors.training.render_dataset import ScanEntry, scan_cameras

    cfg = load_config("miniature", overrides=FACE).render.camera
    assert cfg.target == (0.0, -0.15, 0.25) and CameraConfig().target == (0.0, 0.0, 0.0)
    _, cams = draw_views(torch.Generator().manual_seed(0), 2, 3, cfg)
    torch.testing.assert_close(_ndc(cams, cfg.target), torch.zeros(3, 1, 2), atol=1e-5, rtol=0)
    entry = ScanEntry(subject="000", expression_id="000", expression="neutral", path=Path("scan.ply"))
    cams = scan_cameras(entry, 3, 0, cfg)
    torch.testing.assert_close(_ndc(cams, cfg.target), torch.zeros(3, 1, 2), atol=1e-5, rtol=0)


def test_geometry_schedule_is_the_papers_unless_the_config_says_otherwise():
    paper = SCHEDULES["geometry"]
    got = geometry_schedule(load_config("miniature").geometry)
    assert [got.range_at(s, 100) for s in range(100)] == [paper.range_at(s, 100) for s in range(100)]
    late = geometry_schedule(load_config("miniature", overrides=[
        "geometry.t_range=[50, 300]", "geometry.t_range_end=[20, 100]", "geometry.t_anneal_from=0.8"]).geometry)
    assert late.range_at(0, 100) == late.range_at(79, 100) == (50, 300) and late.range_at(99, 100) == (20, 100)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Two synthetic subjects (neutral + mouth_open) in a miniature WORK folder's layout."""
    root = tmp_path_factory.mktemp("work")
    res = CliRunner().invoke(app, ["synth-scans", str(root / "scans"), "--subjects", "2", "--expressions",
                                   "neutral,mouth_open"])
    assert res.exit_code == 0, res.output
    return root


def test_face_centred_views_carry_a_larger_identity_and_expression_signal(work):
    signal = _example("miniature_signal")
    whole = signal.main([str(work), "--sizes", "16"])[0]
    face = signal.main([str(work), "--sizes", "16"] + [a for kv in FACE for a in ("--set", kv)])[0]
    assert whole["subject_vs_subject"] > 0 and whole["neutral_vs_mouth_open"] > 0
    assert face["subject_vs_subject"] > 1.5 * whole["subject_vs_subject"]
    assert face["neutral_vs_mouth_open"] > 1.5 * whole["neutral_vs_mouth_open"]


def test_oracle_control_runs_the_experiments_sds_with_the_configured_schedule(work):
    oracle = _example("miniature_oracle")
    tiny = ["geometry.grid_resolution=16", "template.build_resolution=32", "template.iterations=30",
            "template.points_per_step=1000", "geometry.iterations=4", "expressions=[neutral]",
            "geometry.t_range=[900, 950]", "geometry.t_anneal_from=1.0", "geometry.checkpoint_every=1000",
            "geometry.preview_every=1000"]
    run = oracle.main([str(work), "001", "--variant", "ctl"] + [a for kv in tiny for a in ("--set", kv)])
    assert run == work / "runs" / "ctl" / "001"
    assert (run / "geometry" / "neutral.ply").is_file() and (run / "geometry" / "init_neutral.ply").is_file()
    log = [json.loads(x) for x in (run / "geometry" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(900 <= r["t"] <= 950 for r in log)
    with pytest.raises(SystemExit, match="no subject 009"):
        oracle.main([str(work), "009"])


def test_gradient_check_splits_an_oracles_step_into_all_along_and_nothing_across():
    from idto3d.core.config import GuidanceConfig
    from idto3d.priors.guidance import OracleGuidance

    check = _example("miniature_grad_check")
    gen = torch.Generator().manual_seed(0)
    start, truth = torch.rand(3, 4, 32, 32, generator=gen), torch.rand(3, 4, 32, 32, generator=gen)
    oracle = OracleGuidance(truth, GuidanceConfig(latent_mode="downsample", latent_size=8))
    z, z_star = oracle.encode(start), oracle.encode(truth)
    for t in (100, 500):
        abar = float(oracle.alphas_cumprod[t])
        d = (abar / (1 - abar)) ** 0.5 * (z - z_star)
        got = check.split(check.mean_steps(oracle, z, t, None, 3, gen), d)
        assert got["along"] == pytest.approx(1.0, abs=1e-4) and got["across"] < 1e-3 and got["cos"] > 0.9999
        assert got["step"] == pytest.approx(1.0, abs=1e-3)
        # From another start the step is measured in units of the template's d0: here half of it.
        assert check.split(d, d, 2 * d)["step"] == pytest.approx(0.5, rel=1e-6)
    # A step half toward the truth plus as much again elsewhere: along 0.5, across |e| / |d|.
    e = torch.randn(d.shape, generator=gen)
    e -= ((e * d).flatten(1).sum(1) / (d * d).flatten(1).sum(1))[:, None, None, None] * d
    got = check.split(0.5 * d + e, d)
    ratio = (e.flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)).mean()
    assert got["along"] == pytest.approx(0.5, abs=1e-5) and got["across"] == pytest.approx(float(ratio), rel=1e-4)


def test_render_dataset_records_a_face_centred_camera_and_keeps_older_datasets_resumable(work, tmp_path):
    def render(out: Path, *sets: str):
        args = ["render-dataset", str(work / "scans"), "-o", str(out), "--metadata",
                str(work / "scans" / "subjects.csv"), "--views", "1", "--resolution", "32", "--normals-only"]
        return CliRunner().invoke(app, args + [a for kv in sets for a in ("--set", kv)])

    assert render(tmp_path / "whole").exit_code == 0
    # A dataset rendered before render.camera.target existed has no target in its manifest: still the same settings.
    assert "target" not in json.loads((tmp_path / "whole" / "dataset.json").read_text())["camera"]
    assert render(tmp_path / "whole").exit_code == 0
    refused = render(tmp_path / "whole", *FACE)
    assert refused.exit_code != 0 and "different settings (camera)" in refused.output
    assert render(tmp_path / "face", *FACE).exit_code == 0
    assert json.loads((tmp_path / "face" / "dataset.json").read_text())["camera"]["target"] == [0.0, -0.15, 0.25]


def test_expression_check_measures_progress_along_the_truths_gap():
    check = _example("miniature_expression_check")
    gen = torch.Generator().manual_seed(0)
    n, e, orth = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    gap = e - n
    orth -= (orth * gap).sum() / (gap * gap).sum() * gap
    assert check.progress(n, n, e) == pytest.approx((0.0, 0.0), abs=1e-9)
    assert check.progress(e, n, e) == pytest.approx((1.0, 0.0), abs=1e-9)
    p, off = check.progress(n + 0.3 * gap + orth, n, e)
    assert p == pytest.approx(0.3, abs=1e-6) and off == pytest.approx(float(orth.norm() / gap.norm()), rel=1e-6)


def test_expression_check_puts_a_run_of_the_truths_at_0_and_1_and_a_swapped_one_on_the_wrong_side(work, monkeypatch):
    import shutil

    from idto3d.core.expressions import EXPRESSION_NAMES

    monkeypatch.syspath_prepend(str(EXAMPLES))
    check = _example("miniature_expression_check")
    scans = work / "scans" / "001"
    neutral, mouth = (scans / f"{EXPRESSION_NAMES.index(e):03d}" / "scan.ply" for e in ("neutral", "mouth_open"))
    for variant, (for_neutral, for_mouth) in {"truths": (neutral, mouth), "swapped": (mouth, neutral)}.items():
        geo = work / "runs" / variant / "001" / "geometry"
        geo.mkdir(parents=True)
        shutil.copy(for_neutral, geo / "neutral.ply")
        shutil.copy(for_mouth, geo / "mouth_open.ply")
    runs = [str(work / "runs" / v / "001") for v in ("truths", "swapped")]
    rows = check.main([str(work), *runs, "--views", "3"] + [a for kv in FACE for a in ("--set", kv)])
    got = {(r["variant"], r["mesh"]): r for r in rows if "run" in r}
    assert got["truths", "neutral"]["progress"] == pytest.approx(0.0, abs=1e-9)
    assert got["truths", "mouth_open"]["progress"] == pytest.approx(1.0, abs=1e-9)
    assert got["swapped", "neutral"]["progress"] == pytest.approx(1.0, abs=1e-9)
    assert all(r["closer_to_own"] for (v, _), r in got.items() if v == "truths")
    assert not any(r["closer_to_own"] for (v, _), r in got.items() if v == "swapped")
    means = {(r["variant"], r["mesh"]): r for r in rows if "runs" in r}
    assert means["swapped", "mouth_open"]["closer_to_own"] == 0.0 and means["truths", "neutral"]["runs"] == 1
    with pytest.raises(SystemExit, match="not an expression other than neutral"):
        check.main([str(work), "--expression", "neutral"])


def test_gradient_check_can_start_from_the_subjects_scan_in_another_expression():
    check = _example("miniature_grad_check")
    scans = {"neutral": "neutral scan", "mouth_open": "mouth_open scan"}.__getitem__
    assert check.start_mesh(None, "truth:neutral", "target scan", scans) == "neutral scan"
    assert check.start_mesh(None, "truth", "target scan", scans) == "target scan"
    with pytest.raises(SystemExit, match="no such mesh file"):
        check.start_mesh(None, "nowhere.ply", "target scan", scans)
