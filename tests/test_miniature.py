"""The miniature experiment's commands chain together: synth-scans -> synth-identities -> render-dataset ->
make-base -> train-prior with the miniature preset (few subjects, few steps; the real numbers are in the README)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from idto3d.cli.app import app
from idto3d.core.config import load_config


def _ok(args: list[str]) -> str:
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.output


def test_miniature_preset_is_sized_for_a_cpu():
    cfg = load_config("miniature")
    assert cfg.render.resolution == 64 == cfg.prior.train.resolution
    # Downsampled-normal latents (no VAE) and a trained base UNet: a random VAE cannot carry a normal map, and
    # adapters over a random base never make a denoiser (README "Miniature experiment").
    assert cfg.prior.train.latent_mode == cfg.prior.guidance.latent_mode == "downsample"
    assert cfg.prior.guidance.latent_size * 4 == cfg.render.resolution
    assert cfg.prior.train.base
    assert cfg.prior.train.condition_dropout > 0  # CFG needs an unconditional branch


def test_miniature_base_is_a_few_million_parameters(tmp_path):
    from diffusers import UNet2DConditionModel

    _ok(["make-base", str(tmp_path / "base"), "--size", "miniature"])
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "base" / "unet")
    n = sum(p.numel() for p in unet.parameters())
    assert 2e6 < n < 8e6
    assert unet.config.down_block_types[0] == "CrossAttnDownBlock2D"  # SD1.5's block layout


def test_commands_chain_from_synthetic_scans_to_a_trained_prior(tmp_path):
    scans, ids, data, base, prior = (tmp_path / n for n in ("scans", "ids", "data", "base", "prior"))
    _ok(["synth-scans", str(scans), "--subjects", "2", "--expressions", "neutral,mouth_open"])
    _ok(["synth-identities", str(scans), "-o", str(ids), "--backend", "synthetic"])
    _ok(["render-dataset", str(scans), "-o", str(data), "--metadata", str(scans / "subjects.csv"), "--views", "2",
         "--resolution", "32", "--normals-only", "--identities", str(ids)])
    _ok(["make-base", str(base), "--size", "tiny"])
    _ok(["train-prior", "normal", "--data", str(data), "-o", str(prior), "-p", "miniature", "--base-model", str(base),
         "--set", "prior.train.steps=2", "--set", "prior.train.resolution=32", "--set", "prior.train.batch_size=2"])
    lines = [json.loads(x) for x in (data / "index.jsonl").read_text().splitlines()]
    assert {(r["subject"], r["expression"]) for r in lines} == {
        (s, e) for s in ("000", "001") for e in ("neutral", "mouth_open")}
    assert all(r["id_embedding"] for r in lines)
    assert (prior / "adapters.safetensors").is_file()
    spec = json.loads((prior / "prior_config.json").read_text())
    assert spec["id_dim"] == 128
    assert spec["latents"] == {"mode": "downsample", "size": 16}
    assert (prior / spec["unet_weights"]).is_file()
    # sample-prior follows the recorded latent space: 16x16 images, no VAE decode.
    from PIL import Image

    _ok(["sample-prior", str(prior), "--identity", str(ids / "000.safetensors"), "--expression", "neutral",
         "--expression", "mouth_open", "--steps", "2", "-o", str(tmp_path / "grid.png")])
    assert Image.open(tmp_path / "grid.png").size == (2 * 18, 18)
