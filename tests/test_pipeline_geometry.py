"""The geometry SDS stage and ``idto3d generate``: run folder, resume (in-process and after SIGKILL),
refusal of a different config, non-finite steps, identity/prior size checks."""

from __future__ import annotations

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
import trimesh
from PIL import Image
from typer.testing import CliRunner

from idto3d.cli import app
from idto3d.core.config import AdapterConfig, GuidanceConfig, load_config
from idto3d.core.device import resolve_device
from idto3d.core.errors import IdtoError
from idto3d.identity.io import IdentityEmbedding, save_identity
from idto3d.stages.geometry_stage import run_geometry_stage
from idto3d.stages.initial_geometry import ensure_init
from idto3d.stages.run_folder import prepare_run
from idto3d.priors.guidance import OracleGuidance
from idto3d.priors.prior import build_prior, save_prior

from priors_fixtures import isolated_cache, tiny_base  # noqa: F401  (fixtures)

FAST = ["template.iterations=100", "template.points_per_step=1000", "template.build_resolution=32",
        "geometry.grid_resolution=16", "render.resolution=64", "prior.guidance.latent_size=8",
        "geometry.iterations=6", "geometry.checkpoint_every=2", "geometry.preview_every=3",
        "export.turntable_views=2", "export.turntable_resolution=64", "export.video=false"]
TWO = FAST + ["expressions=[neutral, smile]"]


def _cfg(extra: list[str] | None = None):
    return load_config("preview", None, TWO + (extra or []))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """One template fit of ``TWO`` for the stage tests (the fit itself is tested in test_pipeline_init)."""
    run = tmp_path_factory.mktemp("fitted")
    cfg = _cfg()
    prepare_run(run, cfg)
    ensure_init(run, cfg, progress=False)
    return run / "geometry"


def _run(tmp_path: Path, name: str, fitted: Path) -> Path:
    """A run folder starting from the shared template fit (same seed, grid and template as ``TWO``)."""
    run = tmp_path / name
    for f in ("init.pt", "init_report.json", "init_neutral.ply", "init_smile.ply"):
        (run / "geometry").mkdir(parents=True, exist_ok=True)
        shutil.copy(fitted / f, run / "geometry" / f)
    return run


def _stage(run: Path, cfg, guidance, *, overwrite: bool = False, **kw):
    """The geometry stage as ``generate`` runs it: the run folder prepared and its initial field loaded first."""
    prepare_run(run, cfg, overwrite)
    field = ensure_init(run, cfg, progress=False, device=resolve_device(cfg.runtime.device))
    return run_geometry_stage(run, cfg, guidance, field, **kw)


def _oracle(cfg, nan_steps: set[int] | None = None, policy: str = "raise") -> OracleGuidance:
    """SDS toward a fixed sphere-ish target; ``nan_steps`` makes the noise prediction NaN at those steps."""
    target = torch.full((1, 4, 64, 64), 0.5)
    target[:, 3] = 0.0
    target[:, 3, 16:48, 16:48] = 1.0

    class Stand_in(OracleGuidance):
        step = -1

        def __call__(self, images, cond, step):
            self.step = step
            return super().__call__(images, cond, step)

        def predict_noise(self, z_t, t, cond):
            eps = super().predict_noise(z_t, t, cond)
            return eps * float("nan") if nan_steps and self.step in nan_steps else eps

    gcfg = GuidanceConfig(latent_mode="downsample", latent_size=16, nan_policy=policy)
    return Stand_in(target, gcfg, "geometry", cfg.geometry.iterations, seed=cfg.seed)


def _identity_file(path: Path, dim: int = 128, seed: int = 0) -> Path:
    emb = torch.nn.functional.normalize(torch.randn(dim, generator=torch.Generator().manual_seed(seed)), dim=0)
    ident = IdentityEmbedding(emb, emb[None].clone(), torch.ones(1, dtype=torch.bool), torch.tensor([[0., 0, 10, 10]]),
                              torch.zeros(1, 5, 2), "dlib", photos=[{"path": "x.jpg", "quality": "ok"}])
    save_identity(path, ident)
    return path


@pytest.fixture(scope="module")
def normal_prior(tiny_base, tmp_path_factory) -> Path:  # noqa: F811
    folder = tmp_path_factory.mktemp("prior") / "normal"
    save_prior(build_prior(tiny_base, "normal", 128, AdapterConfig(self_attn_rank=4, cross_attn_rank=4), seed=0),
               folder)
    return folder


def _load_vertices(path: Path) -> np.ndarray:
    return np.asarray(trimesh.load(path, process=False).vertices)


# ---- the stage --------------------------------------------------------------------------------------------

def test_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path, fitted):
    cfg = _cfg()
    full = _stage(_run(tmp_path, "full", fitted), cfg, _oracle(cfg), progress=False)
    assert full.iterations == 6 and full.resumed_from == 0 and full.skipped_steps == 0
    # Stops at 3 (between checkpoints) and 5, then finishes: each call resumes with fresh objects.
    part = _stage(_run(tmp_path, "part", fitted), cfg, _oracle(cfg), progress=False, stop_after=3)
    assert part.iterations == 3 and not (tmp_path / "part" / "geometry" / "done.json").exists()
    part = _stage(tmp_path / "part", cfg, _oracle(cfg), progress=False, stop_after=2)
    assert (part.iterations, part.resumed_from) == (5, 3)
    part = _stage(tmp_path / "part", cfg, _oracle(cfg), progress=False)
    assert (part.iterations, part.resumed_from) == (6, 5)
    for name in cfg.expressions:
        a, b = full.meshes[name].vertices, part.meshes[name].vertices
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=0)
        # The stage moved the surface away from the template fit (SDS did something).
        init = _load_vertices(tmp_path / "full" / "geometry" / f"init_{name}.ply")
        assert init.shape != tuple(a.shape) or not np.allclose(init, a.numpy(), atol=1e-6)
    log = [json.loads(x) for x in (tmp_path / "part" / "geometry" / "log.jsonl").read_text().splitlines()]
    assert [r["it"] for r in log] == list(range(6))
    full_log = [json.loads(x) for x in (tmp_path / "full" / "geometry" / "log.jsonl").read_text().splitlines()]
    assert [r["t"] for r in log] == [r["t"] for r in full_log]
    assert {r["expression"] for r in full_log} == {"neutral", "smile"}


def test_run_folder_outputs_and_a_finished_stage_is_reused(tmp_path):
    cfg = _cfg()
    first = _stage(tmp_path, cfg, _oracle(cfg), progress=False)
    geo = tmp_path / "geometry"
    for name in ("ckpt.pt", "progress.png", "log.jsonl", "done.json", "neutral.ply", "neutral.obj", "smile.ply"):
        assert (geo / name).stat().st_size > 0, name
    assert (tmp_path / "config.yaml").stat().st_mtime_ns <= (geo / "init.pt").stat().st_mtime_ns
    # progress.png: 2 expressions x 4 views, at least 128 px each.
    assert Image.open(geo / "progress.png").size == (4 * 128, 2 * 128)
    ckpt = torch.load(geo / "ckpt.pt", weights_only=True)
    assert ckpt["iteration"] == 6 and {"optimizer", "sampler", "guidance", "torch_rng"} <= set(ckpt)
    stamp = (geo / "ckpt.pt").stat().st_mtime_ns
    again = _stage(tmp_path, cfg, _oracle(cfg), progress=False)
    assert (geo / "ckpt.pt").stat().st_mtime_ns == stamp
    assert torch.equal(again.meshes["smile"].vertices, first.meshes["smile"].vertices)
    assert np.allclose(_load_vertices(geo / "smile.ply"), first.meshes["smile"].vertices.numpy(), atol=1e-6)
    assert not list(tmp_path.rglob("*.tmp*")), "temp files left behind"
    # Same folder, another identity: refused rather than silently mixed.
    with pytest.raises(IdtoError, match="different identity or prompt"):
        _stage(tmp_path, cfg, _oracle(cfg), progress=False, subject="a child")


def test_a_different_config_is_refused_unless_overwrite(tmp_path, fitted):
    cfg = _cfg()
    tmp_path = _run(tmp_path, "run", fitted)
    _stage(tmp_path, cfg, _oracle(cfg), progress=False, stop_after=2)
    other = _cfg(["seed=1"])
    with pytest.raises(IdtoError, match="different config.*--overwrite"):
        _stage(tmp_path, other, _oracle(other), progress=False)
    res = _stage(tmp_path, other, _oracle(other), progress=False, overwrite=True, stop_after=1)
    assert res.resumed_from == 0 and res.iterations == 1  # started over, not resumed from seed 0's checkpoint


def test_non_finite_steps_are_skipped_and_counted(tmp_path, fitted):
    cfg = _cfg(["geometry.max_bad_steps=2"])
    with pytest.warns(RuntimeWarning, match="not finite"):
        res = _stage(_run(tmp_path, "skip", fitted), cfg, _oracle(cfg, {1, 3}, policy="skip"),
                                 progress=False)
    res_raise = _stage(_run(tmp_path, "raise", fitted), cfg, _oracle(cfg, {1, 3}), progress=False)
    for r in (res, res_raise):
        assert r.iterations == 6 and r.skipped_steps == 2
    log = [json.loads(x) for x in (tmp_path / "raise" / "geometry" / "log.jsonl").read_text().splitlines()]
    assert [r["it"] for r in log if r["skipped"]] == [1, 3]
    assert torch.equal(res.meshes["neutral"].vertices, res_raise.meshes["neutral"].vertices)


def test_bad_steps_in_a_row_stop_the_run_leaving_the_last_good_checkpoint(tmp_path, fitted):
    cfg = _cfg(["geometry.max_bad_steps=3", "geometry.iterations=12"])
    tmp_path = _run(tmp_path, "run", fitted)
    bad = set(range(5, 12))
    with pytest.raises(IdtoError, match=r"3 steps in a row.*non-finite.*iteration 4\)"):
        _stage(tmp_path, cfg, _oracle(cfg, bad), progress=False)
    geo = tmp_path / "geometry"
    assert torch.load(geo / "ckpt.pt", weights_only=True)["iteration"] == 4
    assert not (geo / "done.json").exists()
    # The checkpoint is usable: a fixed guidance resumes from it and finishes.
    res = _stage(tmp_path, cfg, _oracle(cfg), progress=False)
    assert (res.resumed_from, res.iterations, res.skipped_steps) == (4, 12, 0)


# ---- generate ---------------------------------------------------------------------------------------------

def _set(items: list[str]) -> list[str]:
    return [a for x in items for a in ("--set", x)]


@pytest.mark.slow
def test_generate_from_a_photo_end_to_end_with_a_tiny_prior(tmp_path, normal_prior):
    from skimage import data

    photo = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(photo)
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["generate", str(photo), "--out", str(run), "--normal-prior", str(normal_prior),
                                      "--prompt", "a woman", "--expressions", "neutral,smile", *_set(FAST)])
    assert result.exit_code == 0, result.output
    config = run / "config.yaml"
    # The config is written once the inputs are checked (after the identity), before any stage output.
    for path in (run / "geometry" / "ckpt.pt", run / "geometry" / "progress.png", run / "geometry" / "done.json"):
        assert path.stat().st_size > 0 and config.stat().st_mtime_ns <= path.stat().st_mtime_ns, path
    assert list((run / "crops").glob("*.png"))
    for name in ("neutral", "smile"):
        for ext in (".ply", ".obj"):
            assert _load_vertices(run / "geometry" / f"{name}{ext}").shape[0] > 100
        # No albedo prior: exported with the grey placeholder material, and the run says so.
        assert (run / "export" / f"{name}.glb").stat().st_size > 0
        assert (run / "renders" / f"{name}_turntable.png").stat().st_size > 0
    assert "no albedo prior" in result.output
    log = [json.loads(x) for x in (run / "geometry" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and all(np.isfinite(r["loss"]) and not r["skipped"] for r in log)


def test_generate_from_an_identity_file_without_photos_or_priors_exports_the_template_fit(tmp_path):
    run = tmp_path / "run"
    ident = _identity_file(tmp_path / "id.safetensors")  # its photo (x.jpg) is not at hand: no face fit
    result = CliRunner().invoke(app, ["generate", str(ident), "--out", str(run), *_set(FAST)])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())  # rich wraps long lines
    assert "photos are not at hand" in out and "no normal prior" in out and "plain grey material" in out
    assert (run / "geometry" / "init.pt").exists() and (run / "identity.safetensors").exists()
    assert not (run / "geometry" / "ckpt.pt").exists()  # no SDS without a prior
    assert (run / "export" / "neutral.glb").stat().st_size > 0 and (run / "export" / "done.json").exists()


def test_identity_and_prior_sizes_must_match(tmp_path, normal_prior):
    ident = _identity_file(tmp_path / "arc.safetensors", dim=512)
    result = CliRunner().invoke(app, ["generate", str(ident), "--out", str(tmp_path / "run"),
                                      "--normal-prior", str(normal_prior), *_set(FAST)])
    assert result.exit_code == 2
    assert "512" in result.output and "128" in result.output and "identity.backend" in result.output
    assert not (tmp_path / "run" / "geometry").exists()  # refused before the template fit


def _generate_cmd(ident: Path, run: Path, prior: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "idto3d.cli", "generate", str(ident), "--out", str(run), "--normal-prior",
            str(prior), *_set(FAST + extra)]


@pytest.mark.slow
def test_a_killed_generate_resumes_to_the_uninterrupted_result(tmp_path, normal_prior, isolated_cache):  # noqa: F811
    ident = _identity_file(tmp_path / "id.safetensors")
    extra = ["geometry.iterations=40", "geometry.checkpoint_every=4", "geometry.preview_every=100"]
    env = {**os.environ, "IDTO3D_CACHE": str(isolated_cache)}
    killed = tmp_path / "killed"
    err = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen(_generate_cmd(ident, killed, normal_prior, extra), env=env,
                            stdout=subprocess.DEVNULL, stderr=err)
    ckpt = killed / "geometry" / "ckpt.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    err.close()
    assert ckpt.exists(), (tmp_path / "stderr.txt").read_text()
    assert not (killed / "geometry" / "done.json").exists(), "the run finished before it was killed"
    stopped_at = torch.load(ckpt, weights_only=True)["iteration"]
    assert 0 < stopped_at < 40
    again = subprocess.run(_generate_cmd(ident, killed, normal_prior, extra), env=env, capture_output=True,
                           text=True)
    assert again.returncode == 0, again.stderr
    done = subprocess.run(_generate_cmd(ident, tmp_path / "full", normal_prior, extra), env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a = _load_vertices(killed / "geometry" / "neutral.ply")
    b = _load_vertices(tmp_path / "full" / "geometry" / "neutral.ply")
    assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5


@pytest.mark.slow
def test_bench_geometry_rows(isolated_cache):  # noqa: F811
    from idto3d.bench.geometry import PARTS, bench_geometry

    rows = bench_geometry(repeats=1, quick=True)
    backends = {r["backend"] for r in rows}
    assert backends == {"oracle", "tiny prior (vae)", "oracle, default kernels"}
    for b in backends:
        mine = {r["case"].rsplit(" ", 1)[-1]: r for r in rows if r["backend"] == b}
        assert set(mine) == set(PARTS) | {"total"}
        assert all(r["ms"] > 0 for r in mine.values())
        assert mine["total"]["ms"] == pytest.approx(sum(mine[p]["ms"] for p in PARTS))
    oracle_total = next(r for r in rows if r["backend"] == "oracle" and r["case"].endswith("total"))
    assert oracle_total["ratio"] == 1.0
