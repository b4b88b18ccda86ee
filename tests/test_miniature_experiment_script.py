"""examples/miniature_experiment.sh end to end at the smallest size (the real numbers are in the README): every
command chains, each SDS run is repeated under each seed of SEEDS with that seed's own template fit, and the
metrics group the seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from idto3d.core.config import load_config

SCRIPT = Path(__file__).parents[1] / "examples" / "miniature_experiment.sh"
TINY = {"TRAIN": "2", "HELDOUT": "1", "VIEWS": "1", "STEPS": "2", "GEO_ITERS": "2", "SEEDS": "0 1", "LAMBDA_ID": "3",
        "ID_GUIDANCE": "0.5", "EXP_GUIDANCE": "2",
        "SDS": "prior.guidance.guidance_scale=1 template.iterations=40 template.build_resolution=32"}


def test_the_experiment_runs_every_sds_run_under_every_seed(tmp_path):
    env = {**os.environ, **TINY, "PY": sys.executable}
    res = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    variants = {f"{v}{s}" for v in ("id", "no_id", "oracle") for s in ("", ".s1")}
    assert set(metrics["summary"]) == variants
    assert {r["subject"] for r in metrics["rows"]} == {"012"}
    assert all(metrics["seeds"][v]["seeds"] == [0, 1] for v in ("id", "no_id", "oracle"))
    fits = {v: (tmp_path / "runs" / v / "012" / "geometry" / "init_report.json").read_text() for v in variants}
    # One template fit per seed, copied into that seed's other runs (a refit would record other seconds); the two
    # seeds' fits differ (the seed is in the fit's key).
    assert fits["id"] == fits["no_id"] == fits["oracle"] != fits["id.s1"] == fits["no_id.s1"] == fits["oracle.s1"]
    assert json.loads(fits["id"])["key"] != json.loads(fits["id.s1"])["key"]
    guidance = {v: load_config(file=tmp_path / "runs" / v / "012" / "config.yaml").prior.guidance
                for v in ("id", "no_id", "id.s1")}
    assert {v: g.lambda_id for v, g in guidance.items()} == {"id": 3.0, "no_id": 0.0, "id.s1": 3.0}
    assert {v: g.id_guidance_scale for v, g in guidance.items()} == {"id": 0.5, "no_id": 0.0, "id.s1": 0.5}
    assert {g.exp_guidance_scale for g in guidance.values()} == {2.0}
    assert (tmp_path / "figure.png").is_file() and (tmp_path / "grad_check.jsonl").is_file()
    grad = [json.loads(x) for x in (tmp_path / "grad_check.jsonl").read_text().splitlines()]
    assert {(r["delta"], r["start"], r["expression"]) for r in grad} == {
        (None, "template", "neutral"), (None, "truth", "neutral"), ("id", "template", "neutral"),
        ("expression", "truth:neutral", "mouth_open")}
    expr = [json.loads(x) for x in (tmp_path / "expression_check.jsonl").read_text().splitlines()]
    assert {(r["variant"], r["mesh"]) for r in expr if "run" in r} == {
        (v, m) for v in variants for m in ("neutral", "mouth_open")}
    assert "Over SDS seeds" in (tmp_path / "figure.html").read_text()
    # The prior check also denoises the held-out subject's renders (1 subject x 2 expressions x 1 view), with the
    # ID branch on and off: off drops the subject's identity tokens, so the loss changes.
    gen = json.loads((tmp_path / "prior_check.json").read_text())["generalisation"]
    assert gen["heldout_images"] == 2 and set(gen["heldout"]) == {"50", "200", "500", "800"}
    assert all(gen["heldout"][t] != gen["heldout_id_off"][t] for t in gen["heldout"])
