"""Claims about prior fine-tuning: L_simple goes down, resume is exact, bad inputs fail clearly, CLI runs."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from safetensors.torch import load_file
from typer.testing import CliRunner

from idto3d.cli import app
from idto3d.core.config import load_config
from idto3d.core.errors import IdtoError
from idto3d.priors.training.dataset import PriorDataError, PriorDataset
from idto3d.priors.prior import build_prior, load_prior, save_prior
from idto3d.priors.tiny import make_tiny_base_model
from idto3d.priors.training.objective import DenoisingObjective, StepBatches, denoising_loss, drop_masks, prepare_inputs
from idto3d.priors.training.train import TrainError, train_prior

sys.path.insert(0, str(Path(__file__).parent))
from test_priors_dataset import write_data  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_tiny_base_model(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data") / "d", size=64)


def _cfg(*overrides: str):
    return load_config("preview", overrides=["prior.train.resolution=64", "prior.train.batch_size=4",
                                             *overrides])


@pytest.mark.slow
def test_fine_tuning_lowers_the_denoising_loss_on_a_fixed_batch(base, data, tmp_path):
    torch.manual_seed(0)
    start = build_prior(base, "normal", 128)
    save_prior(start, tmp_path / "init")
    ds = PriorDataset(data, "normal", 64, id_dim=128)
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    # Fixed images, noise, timesteps and conditions (no dropout) for both evaluations.
    inputs = prepare_inputs(start, batch, torch.Generator().manual_seed(123), 0.0)
    with torch.no_grad():
        before = float(denoising_loss(DenoisingObjective(start), inputs))
    cfg = _cfg("prior.train.steps=20", "prior.train.checkpoint_every=20", "prior.train.lr=0.001")
    report = train_prior("normal", data, tmp_path / "out", cfg, base_model=str(base), init=tmp_path / "init",
                         progress=False)
    trained = load_prior(tmp_path / "out")
    with torch.no_grad():
        after = float(denoising_loss(DenoisingObjective(trained), inputs))
    assert after < 0.97 * before, (before, after)
    assert report.steps == 20 and report.samples == 4 and report.trainable_parameters > 0
    # Only adapters changed: the frozen UNet weights are the base model's.
    unet_w = dict(trained.unet.named_parameters())["conv_in.weight"]
    assert torch.equal(unet_w, dict(start.unet.named_parameters())["conv_in.weight"])
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 21)) and all(np.isfinite(r["loss"]) for r in log)
    assert (tmp_path / "out" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_resume_gives_bit_identical_adapters(base, data, tmp_path):
    # Dropout, gradient accumulation and a batch that does not divide the data set all take part.
    common = ["prior.train.checkpoint_every=2", "prior.train.lr=0.001", "prior.train.condition_dropout=0.25",
              "prior.train.gradient_accumulation=2", "prior.train.batch_size=3"]
    train_prior("normal", data, tmp_path / "a", _cfg("prior.train.steps=4", *common), base_model=str(base),
                progress=False)
    train_prior("normal", data, tmp_path / "b", _cfg("prior.train.steps=2", *common), base_model=str(base),
                progress=False)
    rep = train_prior("normal", data, tmp_path / "b", _cfg("prior.train.steps=4", *common), base_model=str(base),
                      resume=True, progress=False)
    assert rep.start_step == 2
    a, b = load_file(tmp_path / "a" / "adapters.safetensors"), load_file(tmp_path / "b" / "adapters.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    init = load_file(tmp_path / "b" / "checkpoints" / "step_000002" / "trainable.safetensors")
    assert any(not torch.equal(init[k], b[k]) for k in b)  # it did train after resuming
    logs = [[json.loads(x)["loss"] for x in (tmp_path / d / "train_log.jsonl").read_text().splitlines()]
            for d in ("a", "b")]
    assert logs[0] == logs[1] and len(logs[0]) == 4


def test_data_order_covers_each_epoch_and_resumes_anywhere():
    s = StepBatches(10, 3, seed=1)
    first = [s.batch(m) for m in range(10)]
    flat = sum(first, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert StepBatches(10, 3, seed=1, start=4).__iter__().__next__() == first[4]
    # Two processes split each global batch without overlap.
    r0, r1 = StepBatches(10, 2, 1, world=2, rank=0), StepBatches(10, 2, 1, world=2, rank=1)
    assert r0.batch(0) + r1.batch(0) == first[0] + [first[1][0]]
    masks = drop_masks(100000, 0.1, torch.Generator().manual_seed(0))
    rates = [float(m.double().mean()) for m in masks]
    assert all(abs(r - 0.2) < 0.01 for r in rates)  # dropped alone (p) or with all (p)
    assert abs(float((masks[0] & masks[1] & masks[2]).double().mean()) - 0.1) < 0.01


def test_bad_inputs_fail_clearly(base, data, tmp_path):
    cfg = _cfg("prior.train.steps=1")
    with pytest.raises(PriorDataError, match="training data folder not found"):
        train_prior("normal", tmp_path / "nope", tmp_path / "o", cfg, base_model=str(base), progress=False)
    with pytest.raises(TrainError, match="unknown domain 'depth'"):
        train_prior("depth", data, tmp_path / "o", cfg, base_model=str(base), progress=False)
    # A prior whose ID projection takes 512-D ArcFace embeddings, data with 128-D dlib ones.
    save_prior(build_prior(base, "normal", 512), tmp_path / "arc")
    with pytest.raises(PriorDataError, match="128-D embedding but the prior expects 512-D"):
        train_prior("normal", data, tmp_path / "o", cfg, base_model=str(base), init=tmp_path / "arc", progress=False)
    with pytest.raises(TrainError, match="is a normal prior"):
        train_prior("albedo", data, tmp_path / "o2", cfg, base_model=str(base), init=tmp_path / "arc",
                    progress=False)
    with pytest.raises(IdtoError, match="IP-Adapter checkpoint not found"):
        train_prior("normal", data, tmp_path / "o3", cfg, base_model=str(base), ip_adapter=tmp_path / "ip.bin",
                    progress=False)
    with pytest.raises(TrainError, match="multiple of 8"):
        train_prior("normal", data, tmp_path / "o", _cfg("prior.train.resolution=60"), progress=False)
    bad = write_data(tmp_path / "bad", size=64)
    lines = (bad / "index.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec["expression"] = "wink"
    (bad / "index.jsonl").write_text("\n".join([json.dumps(rec)] + lines[1:]) + "\n")
    with pytest.raises(PriorDataError, match="line 1: unknown expression 'wink'"):
        train_prior("normal", bad, tmp_path / "o", cfg, base_model=str(base), progress=False)


def test_runs_are_not_overwritten_and_resume_checks_settings(base, data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainError, match="nothing to resume"):
        train_prior("normal", data, out, _cfg("prior.train.steps=1"), base_model=str(base), resume=True,
                    progress=False)
    train_prior("normal", data, out, _cfg("prior.train.steps=1"), base_model=str(base), progress=False)
    with pytest.raises(TrainError, match="already holds a training run; pass --resume"):
        train_prior("normal", data, out, _cfg("prior.train.steps=2"), base_model=str(base), progress=False)
    with pytest.raises(TrainError, match="different settings.*prior.train.lr"):
        train_prior("normal", data, out, _cfg("prior.train.steps=2", "prior.train.lr=0.5"), base_model=str(base),
                    resume=True, progress=False)


def _scans(root: Path) -> Path:
    for s, colour in (("000", (200, 40, 40)), ("001", (40, 40, 200))):
        m = trimesh.creation.icosphere(subdivisions=2)
        m.vertices = m.vertices * np.array([0.9, 1.2, 1.0])
        m.visual.vertex_colors = np.tile([*colour, 255], (len(m.vertices), 1)).astype(np.uint8)
        (root / s / "000").mkdir(parents=True)
        m.export(root / s / "000" / "scan.ply")
    return root


@pytest.mark.slow
def test_cli_renders_then_trains_and_resumes_end_to_end(base, tmp_path):
    runner = CliRunner()
    meta = tmp_path / "subjects.csv"
    meta.write_text("subject,gender,age,ethnicity\n0,female,28,Caucasian\n1,male,60,African\n")
    renders = tmp_path / "renders"
    res = runner.invoke(app, ["render-dataset", str(_scans(tmp_path / "scans")), "--out", str(renders),
                              "--metadata", str(meta), "--views", "2", "--resolution", "64"])
    assert res.exit_code == 0, res.output
    args = ["train-prior", "albedo", "--data", str(renders), "--out", str(tmp_path / "prior"),
            "--base-model", str(base), "--set", "prior.train.checkpoint_every=1", "--set",
            "prior.train.keep_checkpoints=2"]
    res = runner.invoke(app, args + ["--set", "prior.train.steps=2"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, args + ["--set", "prior.train.steps=3", "--resume"])
    assert res.exit_code == 0, res.output
    assert "trained steps 2..3 on 4 images" in res.output
    assert "train-prior albedo: it 2/3 (67%) | stage ETA ?" in res.output  # resumed: counted, not rated
    ckpts = sorted(p.name for p in (tmp_path / "prior" / "checkpoints").iterdir())
    assert ckpts == ["step_000002", "step_000003"]
    prior = load_prior(tmp_path / "prior")
    assert prior.spec.domain == "albedo" and prior.spec.id_dim == 128  # no identities: the dlib size
    res = runner.invoke(app, ["train-prior", "normal", "--data", str(tmp_path / "missing"), "--out",
                              str(tmp_path / "p2"), "--base-model", str(base)])
    assert res.exit_code == 2 and "training data folder not found" in res.output
    res = runner.invoke(app, ["train-prior", "normal", "--data", str(renders), "--out", str(tmp_path / "p3"),
                              "--base-model", str(tmp_path / "no_model"), "--set", "prior.train.steps=1"])
    assert res.exit_code == 2 and "base model folder not found" in res.output


@pytest.mark.slow
def test_runs_in_one_process_may_change_mixed_precision(base, data, tmp_path):
    # accelerate's process-wide state refuses a second Accelerator with other settings unless reset.
    for i, mp in enumerate(("bf16", "'no'")):  # YAML reads a bare no as false
        rep = train_prior("normal", data, tmp_path / f"o{i}", _cfg("prior.train.steps=1",
                          f"prior.train.mixed_precision={mp}"), base_model=str(base), progress=False)
        assert rep.final_loss is not None and np.isfinite(rep.final_loss)
