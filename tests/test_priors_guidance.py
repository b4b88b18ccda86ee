"""Claims about score distillation (paper eq. 6, section B): the SDS gradient, classifier-free guidance,
timestep schedules, the oracle that pulls renders to a known target, and NaN handling."""

import math
import warnings

import pytest
import torch

from idto3d.core.config import GuidanceConfig
from idto3d.priors.guidance import (
    SCHEDULES, GuidanceCond, NonFiniteGradientError, OracleGuidance, SDSGuidance, TimestepSchedule,
    downsample_latents, get_schedule,
)
from priors_fixtures import id_vector, isolated_cache, prior, randomize_adapters, tiny_base  # noqa: F401

PROMPT = "A front view normal map face portrait of a young woman on a white background"


@pytest.mark.parametrize("batch", [1, 2])
def test_sds_gradient_on_latents_is_w_t_times_cfg_eps_hat_minus_eps(prior, batch):
    randomize_adapters(prior)
    cfg = GuidanceConfig(latent_size=8, guidance_scale=7.5, lambda_id=0.8, lambda_exp=0.6)
    guidance = SDSGuidance(prior, cfg, "texture_diffuse", total_steps=10, seed=batch)
    images = torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    cond = GuidanceCond(prompts=[PROMPT], id_embedding=id_vector(0), expressions=["smile"])
    out = guidance(images, cond, step=0)
    out.latents.retain_grad()
    out.loss.backward()

    # eps_hat recomputed independently: two plain predict_noise calls and the CFG formula.
    abar = prior.noise_scheduler.alphas_cumprod[out.t]
    z_t = prior.noise_scheduler.add_noise(out.latents.detach(), out.noise, torch.tensor([out.t]))
    with torch.no_grad():
        e_c = prior.predict_noise(z_t, out.t, prior.encode_text([PROMPT]), id_vector(0),
                                  prior.encode_expressions(["smile"]), lambda_id=0.8, lambda_exp=0.6)
        e_u = prior.predict_noise(z_t, out.t, prior.encode_text([""]))
    eps_hat = e_u + 7.5 * (e_c - e_u)
    want = (1 - abar) * (eps_hat - out.noise)
    assert 50 <= out.t <= 900 and out.w == pytest.approx(float(1 - abar))
    # Float noise only: the batched CFG call and the two separate calls sum in different orders.
    torch.testing.assert_close(out.latents.grad, want / batch, rtol=1e-4, atol=2e-5)
    assert out.grad_norm == pytest.approx(float(want.norm()), rel=1e-4)
    assert images.grad is not None and images.grad.abs().sum() > 0  # it reaches the renders via the VAE


def test_oracle_guidance_drives_an_image_to_its_target():
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    target = torch.stack([xx, yy, 0.5 + 0.4 * torch.sin(6 * xx * yy)])[None]
    cfg = GuidanceConfig(latent_mode="downsample", latent_size=32)
    guidance = OracleGuidance(target, cfg, "texture_diffuse", total_steps=150, seed=0)
    image = torch.full_like(target, 0.5).requires_grad_()
    opt = torch.optim.Adam([image], lr=0.03)
    err0 = (image - target).abs().mean().item()
    for step in range(150):
        opt.zero_grad()
        guidance(image, None, step).loss.backward()
        opt.step()
    err = (image - target).abs().mean().item()
    assert err < err0 / 10, (err0, err)


def test_oracle_noise_prediction_is_the_exact_score():
    target = torch.rand(1, 3, 16, 16)
    guidance = OracleGuidance(target, GuidanceConfig(latent_mode="downsample", latent_size=16, weighting="uniform"),
                              "geometry", total_steps=4, seed=0)
    image = torch.rand(1, 3, 16, 16, requires_grad=True)
    out = guidance(image, None, 0)
    out.latents.retain_grad()
    out.loss.backward()
    abar = float(guidance.alphas_cumprod[out.t])
    want = math.sqrt(abar / (1 - abar)) * (out.latents - guidance.target_latents)
    torch.testing.assert_close(out.latents.grad, want.detach(), rtol=1e-4, atol=1e-5)


def test_geometry_schedule_is_uniform_200_700_then_anneals_to_50_200():
    s = SCHEDULES["geometry"]
    assert s.range_at(0, 1000) == (200, 700) and s.range_at(499, 1000) == (200, 700)
    assert s.range_at(999, 1000) == (50, 200)
    lo, hi = s.range_at(750, 1000)
    assert 50 < lo < 200 and 200 < hi < 700
    g = torch.Generator().manual_seed(0)
    early = [s.sample(i, 1000, g) for i in range(0, 500, 5)]
    late = [s.sample(999, 1000, g) for _ in range(100)]
    assert min(early) >= 200 and max(early) <= 700 and max(early) - min(early) > 300
    assert min(late) >= 50 and max(late) <= 200


def test_texture_schedules_match_the_paper():
    assert get_schedule("texture_diffuse").range_at(10, 100) == (50, 900)
    assert get_schedule("texture_pbr").range_at(10, 100) == (50, 500)
    assert get_schedule("refine").range_at(10, 100) == (50, 100)
    with pytest.raises(Exception, match="unknown timestep schedule 'textur'"):
        get_schedule("textur")
    custom = TimestepSchedule("x", (0, 999))
    assert custom.sample(0, 1, torch.Generator().manual_seed(0), num_train_timesteps=100) <= 99


def test_non_finite_gradient_raises_by_default_and_is_skipped_on_request():
    target = torch.rand(1, 3, 8, 8)
    bad = torch.rand(1, 3, 8, 8)
    bad[0, 0, 0, 0] = float("nan")
    bad.requires_grad_()
    raising = OracleGuidance(target, GuidanceConfig(latent_mode="downsample", latent_size=8), "geometry", 10)
    with pytest.raises(NonFiniteGradientError, match="not finite at step 3"):
        raising(bad, None, 3)
    skipping = OracleGuidance(target, GuidanceConfig(latent_mode="downsample", latent_size=8, nan_policy="skip"),
                              "geometry", 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = skipping(bad, None, 3)
    assert any("skipping this step" in str(w.message) for w in caught)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.grad_norm == 0.0 and bad.grad is None


def test_grad_clip_bounds_every_latent_gradient_element():
    target = torch.zeros(1, 3, 8, 8)
    image = torch.ones(1, 3, 8, 8, requires_grad=True)
    guidance = OracleGuidance(target, GuidanceConfig(latent_mode="downsample", latent_size=8, grad_clip=0.01),
                              "texture_diffuse", 10)
    out = guidance(image, None, 0)
    out.latents.retain_grad()
    out.loss.backward()
    assert out.latents.grad.abs().max() <= 0.01 + 1e-7
    assert out.latents.grad[:, :3].abs().min() == pytest.approx(0.01)  # colour channels: far from target


def test_downsampled_latents_are_normals_and_mask_in_minus_one_to_one():
    normals = torch.rand(2, 3, 64, 64)
    z = downsample_latents(normals, 16)
    assert z.shape == (2, 4, 16, 16)
    torch.testing.assert_close(z[:, 3], torch.ones(2, 16, 16))
    assert z.min() >= -1 - 1e-6 and z.max() <= 1 + 1e-6


def test_same_seed_same_steps(prior):
    cfg = GuidanceConfig(latent_mode="downsample", latent_size=8)
    images = torch.rand(1, 4, 32, 32)
    cond = GuidanceCond(prompts=[PROMPT], id_embedding=id_vector(1))
    ga, gb = SDSGuidance(prior, cfg, "geometry", 10, seed=7), SDSGuidance(prior, cfg, "geometry", 10, seed=7)
    a = [ga(images, cond, i) for i in range(2)]
    b = [gb(images, cond, i) for i in range(2)]
    assert [o.t for o in a] == [o.t for o in b]
    assert all(torch.equal(x.loss, y.loss) for x, y in zip(a, b))
    # Resuming from a checkpointed random state continues the same sequence.
    g = SDSGuidance(prior, cfg, "geometry", 10, seed=7)
    g(images, cond, 0)
    resumed = SDSGuidance(prior, cfg, "geometry", 10, seed=123)
    resumed.load_state_dict(g.state_dict())
    assert torch.equal(resumed(images, cond, 1).loss, a[1].loss)


def test_bench_guidance_quick_reports_the_tiny_prior():
    from idto3d.bench.sds_guidance import bench_guidance

    rows = bench_guidance(repeats=1, quick=True)
    assert [r["baseline"] for r in rows] == ["tiny vae"] * 3 and rows[0]["ratio"] == 1.0
    assert "guidance terms" in rows[2]["case"]
    assert all(r["ms"] > 0 and r["stage"] == "guidance" for r in rows)


@pytest.mark.parametrize("scale", [7.5, 1.0])
@pytest.mark.parametrize("s_id,s_exp", [(2.0, 0.0), (0.0, 1.5), (2.0, 1.5)])
def test_branch_guidance_adds_each_branch_only_direction_to_the_cfg_estimate(prior, scale, s_id, s_exp):
    randomize_adapters(prior)
    cfg = GuidanceConfig(latent_size=8, guidance_scale=scale, lambda_id=0.8, lambda_exp=0.6,
                         id_guidance_scale=s_id, exp_guidance_scale=s_exp)
    guidance = SDSGuidance(prior, cfg, "texture_diffuse", total_steps=10)
    z_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    cond = GuidanceCond(prompts=[PROMPT], id_embedding=id_vector(0), expressions=["smile"])
    with torch.no_grad():
        got = guidance.predict_noise(z_t, 400, cond)
        text, exp = prior.encode_text([PROMPT]).expand(2, -1, -1), prior.encode_expressions(["smile"])

        def eps(lam_id: float, lam_exp: float) -> torch.Tensor:
            return prior.predict_noise(z_t, 400, text, id_vector(0), exp, lambda_id=lam_id, lambda_exp=lam_exp)

        e_c, e_no_id, e_no_exp = eps(0.8, 0.6), eps(0.0, 0.6), eps(0.8, 0.0)
        e_u = prior.predict_noise(z_t, 400, prior.encode_text([""]).expand(2, -1, -1))
    plain = e_u + scale * (e_c - e_u) if scale != 1.0 else e_c
    # both branches matter, so each term is tested
    assert (e_c - e_no_id).abs().max() > 1e-3 and (e_c - e_no_exp).abs().max() > 1e-3
    torch.testing.assert_close(got, plain + s_id * (e_c - e_no_id) + s_exp * (e_c - e_no_exp), rtol=1e-4, atol=2e-5)
    # Off (the default), the estimate is plain CFG again.
    guidance.config.id_guidance_scale = guidance.config.exp_guidance_scale = 0.0
    with torch.no_grad():
        torch.testing.assert_close(guidance.predict_noise(z_t, 400, cond), plain, rtol=1e-4, atol=2e-5)
