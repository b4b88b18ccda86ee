"""``idto3d bench pipeline``: rows per stage and part, a projection of the paper's schedules, clean device errors."""

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from idto3d.cli import app
from idto3d.bench.pipeline import projections
from idto3d.bench.steps import PARTS
from priors_fixtures import isolated_cache  # noqa: F401

runner = CliRunner()


def _assert_one_error_line(result, pattern: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    # one message (the console may wrap it at the terminal's width)
    text = " ".join(result.output.split())
    assert text.startswith("error:") and text.count("error:") == 1, result.output
    assert re.search(pattern, text), text


@pytest.mark.slow
def test_bench_pipeline_json_rows(isolated_cache):  # noqa: F811
    result = runner.invoke(app, ["bench", "pipeline", "--quick", "--json", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    for stage in ("geometry", "texture"):
        mine = [r for r in rows if r["stage"] == f"{stage} SDS (cpu)"]
        parts = {re.match(r".* (\w+)(?: \(peak .*\))?$", r["case"]).group(1): r for r in mine}
        assert set(parts) == set(PARTS) | {"total"}, parts.keys()
        assert all(r["ms"] > 0 and r["ratio"] > 0 for r in mine)
        assert parts["total"]["ms"] == pytest.approx(sum(parts[p]["ms"] for p in PARTS))
        assert parts["total"]["ratio"] == pytest.approx(1.0)  # the tiny prior is the baseline of its own stage
        assert "peak max RSS" in parts["total"]["case"] and parts["total"]["peak_mib"] > 0
    proj = [r for r in rows if r["stage"] == "projection (cpu)"]
    assert any(r["case"].startswith("neutral: 6000 geometry + 2000 texture") for r in proj)
    assert all(r["ms"] > 0 for r in proj)
    for r in rows:
        assert {"stage", "case", "backend", "ms", "baseline", "ratio", "threads", "torch", "machine"} <= set(r)


def test_projection_matches_the_papers_rate():
    # The paper's own rates (30 min / 6000 geometry it., 15 min / 2000 texture it.) must give back its figures.
    (neutral, minutes, ref, _), (geo13, g_min, g_ref, _), (_, t_min, _, _) = projections(
        {"geometry": 300.0, "texture": 450.0})
    assert minutes == pytest.approx(45.0) and ref == pytest.approx(45.0)
    assert g_min == pytest.approx(240.0) and g_ref == pytest.approx(240.0)
    assert t_min == pytest.approx(10000 * 0.45 / 60.0)


def test_cuda_without_cuda_is_one_clean_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _assert_one_error_line(runner.invoke(app, ["bench", "pipeline", "--device", "cuda", "--json"]),
                           r"device cuda: no CUDA device")


def test_bad_device_and_repeats_are_clean_errors():
    _assert_one_error_line(runner.invoke(app, ["bench", "pipeline", "--device", "tpu"]), r"unknown device 'tpu'")
    _assert_one_error_line(runner.invoke(app, ["bench", "pipeline", "--repeats", "0"]), r"--repeats must be > 0")


def test_bench_pipeline_takes_prior_folders_only_together_and_with_full_size():
    for args in (["--normal-prior", "n"], ["--normal-prior", "n", "--albedo-prior", "a"]):
        _assert_one_error_line(runner.invoke(app, ["bench", "pipeline", *args]),
                               r"--normal-prior and --albedo-prior go together, with --full-size")
