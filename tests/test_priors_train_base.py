"""Training the base UNet with the adapters (prior.train.base) on downsampled latents (prior.train.latent_mode):
the trained UNet is saved in the prior folder in diffusers' layout and comes back with it, the latent space is
recorded and SDS follows it, training latents are SDS's downsample latents, and a resumed run is exact."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from idto3d.core.config import GuidanceConfig, load_config
from idto3d.priors.guidance import SDSGuidance, background_mask, downsample_latents
from idto3d.priors.prior import build_prior, load_prior
from idto3d.priors.training.objective import training_latents
from idto3d.priors.training.train import train_prior

sys.path.insert(0, str(Path(__file__).parent))
from cpu_threads import single_thread  # noqa: F401  (fixture)
from priors_fixtures import isolated_cache, tiny_base  # noqa: F401  (fixtures)
from test_priors_dataset import write_data

pytestmark = pytest.mark.usefixtures("single_thread")
BASE_MODE = ["prior.train.base=true", "prior.train.latent_mode=downsample", "prior.guidance.latent_size=16"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data") / "d", size=32)


def _cfg(*overrides: str):
    return load_config("preview", overrides=["prior.train.resolution=32", "prior.train.batch_size=2",
                                             "prior.train.lr=0.001", "prior.train.checkpoint_every=2", *overrides])


def test_trained_base_unet_is_saved_in_diffusers_layout_and_loads_with_the_prior(tiny_base, data, tmp_path):  # noqa: F811
    from diffusers import UNet2DConditionModel

    start = build_prior(tiny_base, "normal", 128)
    train_prior("normal", data, tmp_path / "p", _cfg("prior.train.steps=3", *BASE_MODE), base_model=str(tiny_base),
                progress=False)
    spec = json.loads((tmp_path / "p" / "prior_config.json").read_text())
    assert spec["latents"] == {"mode": "downsample", "size": 16}
    assert spec["unet_weights"] == "unet/diffusion_pytorch_model.safetensors"
    loaded = load_prior(tmp_path / "p")
    w = loaded.base_unet_parameters()["conv_in.weight"]
    assert not torch.equal(w, start.base_unet_parameters()["conv_in.weight"]), "the base UNet did not train"
    # diffusers reads the folder's unet/ as a model of its own, with the weights load_prior laid over the base.
    alone = UNet2DConditionModel.from_pretrained(tmp_path / "p" / "unet")
    assert all(torch.equal(p, loaded.base_unet_parameters()[n]) for n, p in alone.named_parameters())
    # The last checkpoint holds the same UNet (a resume starts from it).
    ckpt = load_file(tmp_path / "p" / "checkpoints" / "step_000003" / "trainable.safetensors")
    assert torch.equal(ckpt["base_unet.conv_in.weight"], w)
    # SDS follows the recorded latent space, whatever the config says.
    guide = SDSGuidance(loaded, GuidanceConfig(latent_mode="vae", latent_size=8))
    assert (guide.config.latent_mode, guide.config.latent_size) == ("downsample", 16)


def test_adapter_only_training_leaves_the_base_and_records_no_latents(tiny_base, data, tmp_path):  # noqa: F811
    train_prior("normal", data, tmp_path / "p", _cfg("prior.train.steps=1"), base_model=str(tiny_base),
                progress=False)
    spec = json.loads((tmp_path / "p" / "prior_config.json").read_text())
    assert spec["latents"] is None and spec["unet_weights"] is None
    assert not (tmp_path / "p" / "unet").exists()
    guide = SDSGuidance(load_prior(tmp_path / "p"), GuidanceConfig(latent_mode="vae", latent_size=8))
    assert guide.config.latent_mode == "vae"


def test_resume_with_the_base_trained_is_bit_identical(tiny_base, data, tmp_path):  # noqa: F811
    common = [*BASE_MODE, "prior.train.condition_dropout=0.25"]
    train_prior("normal", data, tmp_path / "a", _cfg("prior.train.steps=4", *common), base_model=str(tiny_base),
                progress=False)
    train_prior("normal", data, tmp_path / "b", _cfg("prior.train.steps=2", *common), base_model=str(tiny_base),
                progress=False)
    rep = train_prior("normal", data, tmp_path / "b", _cfg("prior.train.steps=4", *common),
                      base_model=str(tiny_base), resume=True, progress=False)
    assert rep.start_step == 2
    for name in ("adapters.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_training_latents_are_sds_downsample_latents_of_the_render(tiny_base):  # noqa: F811
    # A render as the geometry stage makes it: normals over the white background, and its coverage mask.
    g = torch.Generator().manual_seed(0)
    n = torch.nn.functional.normalize(torch.randn(2, 3, 32, 32, generator=g) + torch.tensor([0, 0, 1.5]).view(1, 3, 1, 1),
                                      dim=1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    cov = ((xx**2 + yy**2) < 0.6).float().expand(2, 1, 32, 32)
    rgb = (n * 0.5 + 0.5) * cov + (1 - cov)
    torch.testing.assert_close(background_mask(rgb, (1.0, 1.0, 1.0)), cov)
    prior = build_prior(tiny_base, "normal", 128)
    prior.spec.latents = {"mode": "downsample", "size": 16}
    # The training PNG keeps only the RGB; the latents it trains on are the ones SDS makes from RGB + mask.
    torch.testing.assert_close(training_latents(prior, rgb), downsample_latents(torch.cat([rgb, cov], 1), 16))


def test_sds_sees_an_antialiased_render_as_training_saw_its_png(tiny_base):  # noqa: F811
    # Real renders' edge pixels are partly covered: the PNG blends them with the background and training marks
    # them 1 (background rule); SDS must make the same latents from RGB + fractional coverage, yet still pass
    # the coverage's gradient (straight-through), or the silhouette would get none through the mask channel.
    g = torch.Generator().manual_seed(0)
    n = torch.nn.functional.normalize(torch.randn(2, 3, 32, 32, generator=g) + torch.tensor([0, 0, 1.5]).view(1, 3, 1, 1),
                                      dim=1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    cov = ((0.8 - (xx**2 + yy**2).sqrt()) * 8).clamp(0, 1).expand(2, 1, 32, 32).clone().requires_grad_(True)
    assert ((cov > 0) & (cov < 1)).float().mean() > 0.05  # an antialiased edge
    rgb = (n * 0.5 + 0.5) * cov + (1 - cov)
    prior = build_prior(tiny_base, "normal", 128)
    prior.spec.latents = {"mode": "downsample", "size": 16}
    sds = SDSGuidance(prior, GuidanceConfig(latent_mode="downsample", latent_size=16))
    z = sds.encode(torch.cat([rgb, cov], 1))
    torch.testing.assert_close(z, training_latents(prior, rgb.detach()))
    z[:, 3].sum().backward()
    assert cov.grad is not None and cov.grad.abs().sum() > 0
    # The render's own coverage (the old convention) differs from what training saw at the edges.
    old = SDSGuidance(prior, GuidanceConfig(latent_mode="downsample", latent_size=16, downsample_mask="coverage"))
    assert (old.encode(torch.cat([rgb, cov], 1)) - z).abs().max() > 0.1


def test_the_cooldown_lowers_the_lr_for_the_last_steps_and_resumes_exactly(tiny_base, data, tmp_path):  # noqa: F811
    from idto3d.priors.training.train import learning_rate

    cool = [*BASE_MODE, "prior.train.lr_decay_fraction=0.5", "prior.train.lr_decay_factor=0.1"]
    tc = _cfg("prior.train.steps=4", *cool).prior.train
    assert [learning_rate(tc, s) for s in range(1, 5)] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])
    train_prior("normal", data, tmp_path / "a", _cfg("prior.train.steps=4", *cool), base_model=str(tiny_base),
                progress=False)
    log = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])
    # The optimiser really ran at the logged lr: the constant-lr run ends elsewhere.
    train_prior("normal", data, tmp_path / "c", _cfg("prior.train.steps=4", *BASE_MODE), base_model=str(tiny_base),
                progress=False)
    name = "unet/diffusion_pytorch_model.safetensors"
    a, c = load_file(tmp_path / "a" / name), load_file(tmp_path / "c" / name)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # Interrupted after the checkpoint at step 2 (the steps in the log past it are dropped) and resumed: the same.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_000004")
    train_prior("normal", data, tmp_path / "b", _cfg("prior.train.steps=4", *cool), base_model=str(tiny_base),
                resume=True, progress=False)
    b = load_file(tmp_path / "b" / name)
    assert all(torch.equal(a[k], b[k]) for k in a)
