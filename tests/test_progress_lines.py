"""Progress in logs: plain lines (stage k/n, iteration, loss, ETA) when the output is not a terminal, throttled
and flushed at once; the overall stage count and ETA."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from idto3d.core import progress as prog
from idto3d.core.errors import IdtoError
from idto3d.identity.io import IdentityEmbedding, save_identity


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_plain_lines_are_throttled_and_carry_stage_loss_and_eta():
    clock, out = FakeClock(), []
    plan = prog.Pipeline(["identity", "head", "export"], clock)
    plan.begin("identity")
    clock.t += 20.0
    plan.end()
    plan.begin("head")
    lines = prog.PlainLines("SDF regression", 100, out.append, every=10.0, clock=clock, plan=plan)
    lines.start()
    for _ in range(50):  # 50 iterations over 6.25 s (exact in binary): under the interval, no line
        clock.t += 0.125
        lines.update(loss=0.5)
    assert len(out) == 1 and out[0].startswith("stage 2/3 head / SDF regression: it 0/100")
    clock.t += 3.75
    lines.update(loss=0.25)  # 10 s since the start line: one line
    assert len(out) == 2
    assert re.fullmatch(r"stage 2/3 head / SDF regression: it 51/100 \(51%\) loss=0\.25 5\.1 it/s "
                        r"\| stage ETA 10s \| overall ETA ~\d+s", out[1]), out[1]
    # Overall: 9.6 s left here + one stage to come at the mean of (20 s, 10 s + 9.6 s).
    assert out[1].endswith(f"overall ETA ~{prog.format_duration(49 / 5.1 + (20 + 10 + 49 / 5.1) / 2)}")
    lines.update()
    assert len(out) == 2  # throttled again
    lines.finish()
    assert len(out) == 3 and "it 52/100" in out[2]


def test_a_resumed_loop_rates_only_the_iterations_this_process_ran():
    clock, out = FakeClock(), []
    lines = prog.PlainLines("train-prior normal", 20000, out.append, every=10.0, clock=clock, done=10000)
    lines.start()
    assert out[0] == "train-prior normal: it 10000/20000 (50%) | stage ETA ?"  # no rate before a step here
    for _ in range(25):  # 25 steps in 10 s: 2.5 it/s, 10000 - 25 steps left
        clock.t += 0.4
        lines.update()
    assert out[1] == f"train-prior normal: it 10025/20000 (50%) 2.5 it/s | stage ETA {prog.format_duration(9975 / 2.5)}"


def test_a_resumed_sds_stage_counts_its_earlier_iterations_but_does_not_rate_them(tmp_path, monkeypatch):
    from geometry_stage_driver import oracle_guidance, run_geometry, sphere_field, stage_config

    monkeypatch.setenv(prog.EVERY_ENV, "0")
    cfg = stage_config(["geometry.iterations=4", "geometry.checkpoint_every=2"])
    run_geometry(tmp_path / "run", cfg, oracle_guidance(cfg), sphere_field(cfg), stop_after=2, progress=False)
    stream = io.StringIO()
    run_geometry(tmp_path / "run", cfg, oracle_guidance(cfg), sphere_field(cfg),
                 console=Console(file=stream, force_terminal=False), progress=True)
    lines = [x for x in stream.getvalue().splitlines() if ": it " in x]
    assert lines[0].endswith(": it 2/4 (50%) | stage ETA ?"), lines  # the resume: counted, no rate yet
    assert re.search(r": it 3/4 \(75%\) .* it/s \| stage ETA ", lines[1]), lines


def test_pipeline_counts_stages_and_skips_unneeded_ones():
    clock = FakeClock()
    plan = prog.Pipeline(["a", "b", "c", "d"], clock)
    plan.begin("a")
    assert plan.label() == "stage 1/4 a" and plan.overall_eta(None) is None  # no rate yet
    clock.t += 4.0
    assert plan.overall_eta(2.0) == 2.0 + 3 * 6.0  # 3 stages to come at (4 s + 2 s) each
    plan.end()
    plan.skip("c")
    plan.begin("d")
    assert plan.label() == "stage 3/3 d"
    assert plan.overall_eta(5.0) == 5.0  # the last stage: only its own remainder


def test_plain_mode_when_not_a_terminal_flushes_each_line(monkeypatch):
    class Stream(io.StringIO):
        flushed = ""

        def flush(self) -> None:
            self.flushed = self.getvalue()

    stream = Stream()
    console = Console(file=stream, force_terminal=False)
    monkeypatch.setenv(prog.EVERY_ENV, "0")
    with prog.pipeline(["one", "two"]):
        with prog.pipeline_stage("one", console):
            with prog.progress_bar("loop", 3, console) as update:
                for _ in range(3):
                    update(loss=1.0)
                    assert stream.flushed == stream.getvalue()  # every line is out as soon as written
    text = stream.getvalue().splitlines()
    assert text[0] == "[idto3d] stage 1/2 one: started"
    assert sum("stage 1/2 one / loop: it" in x for x in text) == 5  # start, 3 updates (every 0 s), end
    assert text[-1].startswith("[idto3d] stage 1/2 one: done in") and "overall ETA ~" in text[-1]


def test_progress_every_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(prog.EVERY_ENV, raising=False)
    assert prog.progress_every() == 10.0
    monkeypatch.setenv(prog.EVERY_ENV, "0.25")
    assert prog.progress_every() == 0.25
    monkeypatch.setenv(prog.EVERY_ENV, "soon")
    with pytest.raises(IdtoError, match=prog.EVERY_ENV):
        prog.progress_every()


def test_generate_refuses_a_bad_interval_before_any_work(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from idto3d.cli import app

    monkeypatch.setenv(prog.EVERY_ENV, "-1")
    ident = _identity_file(tmp_path / "id.safetensors")
    result = CliRunner().invoke(app, ["generate", str(ident), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and f"error: {prog.EVERY_ENV}" in result.output, result.output
    assert not (tmp_path / "run" / "identity.safetensors").exists()


def _identity_file(path: Path) -> Path:
    emb = torch.nn.functional.normalize(torch.randn(128, generator=torch.Generator().manual_seed(0)), dim=0)
    save_identity(path, IdentityEmbedding(emb, emb[None].clone(), torch.ones(1, dtype=torch.bool),
                                          torch.tensor([[0., 0, 10, 10]]), torch.zeros(1, 5, 2), "dlib",
                                          photos=[{"path": "x.jpg", "quality": "ok"}]))
    return path


SHORT = ["template.iterations=400", "template.points_per_step=1000", "template.build_resolution=32",
         "geometry.grid_resolution=16", "export.turntable_views=2", "export.turntable_resolution=64",
         "export.video=false"]


@pytest.mark.slow
def test_generate_writes_progress_lines_to_a_log_while_a_stage_runs(tmp_path):
    """``generate`` with stdout/stderr in a file: progress lines are in the file before the process ends."""
    ident = _identity_file(tmp_path / "id.safetensors")
    cmd = [sys.executable, "-m", "idto3d.cli", "generate", str(ident), "--out", str(tmp_path / "run"),
           *[a for x in SHORT for a in ("--set", x)]]
    log = tmp_path / "log.txt"
    env = {**os.environ, prog.EVERY_ENV: "0.2", "OMP_NUM_THREADS": "1"}
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            seen = [x for x in log.read_text().splitlines() if re.search(r"/ SDF regression: it (\d+)/400", x)]
            if any(0 < int(re.search(r"it (\d+)/", x).group(1)) < 400 for x in seen):
                break
            time.sleep(0.05)
        running = proc.poll() is None
    finally:
        proc.wait(timeout=300)
    text = log.read_text()
    assert running and seen, f"no progress line while the stage ran:\n{text[-2000:]}"
    assert proc.returncode == 0, text[-2000:]
    assert re.search(r"stage 3/4 head / SDF regression: it \d+/400 \(\d+%\) loss=\S+ .*\| stage ETA \S+ "
                     r"\| overall ETA ~\S+", seen[-1]), seen[-1]
    for k, name in enumerate(["identity + priors", "face fit", "head", "export"], 1):
        assert f"[idto3d] stage {k}/4 {name}: started" in text and f"stage {k}/4 {name}: done in" in text
