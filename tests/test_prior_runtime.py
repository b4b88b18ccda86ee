"""Claims about the prior's runtime options (``priors.runtime.configure_prior``, issue 9): each option gives
what the fp32 / SDPA / contiguous / eager reference gives (to float rounding for kernels and layout, to a few
percent for half precision), fp32 renders get fp32 gradients, and what was applied is recorded."""

import shutil

import pytest
import torch

from idto3d.core.config import GuidanceConfig, RuntimeConfig, load_config
from idto3d.core.errors import ConfigError, IdtoError
from idto3d.priors.guidance import GuidanceCond, SDSGuidance
from idto3d.priors.prior import build_prior
from idto3d.priors.prior_runtime import configure_prior, runtime_summary
from priors_fixtures import ID_DIM, id_vector, isolated_cache, randomize_adapters, tiny_base  # noqa: F401

PROMPT = "A front view normal map face portrait of a young woman on a white background"


def _prior(tiny_base, runtime: RuntimeConfig | None = None):
    # Random adapters (zero-initialised LoRA ups included), so every adapter path carries signal.
    prior = build_prior(tiny_base, "normal", ID_DIM, seed=0)
    randomize_adapters(prior)
    return configure_prior(prior, runtime, "cpu") if runtime is not None else prior


def _sds(prior, seed: int = 0):
    """eps_hat (CFG, ID + expression branches on) and the SDS gradient on a fp32 render."""
    guidance = SDSGuidance(prior, GuidanceConfig(latent_size=8, guidance_scale=7.5), "texture_diffuse", 10, seed=seed)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    cond = GuidanceCond(prompts=[PROMPT], id_embedding=id_vector(0), expressions=["smile"])
    out = guidance(images, cond, step=0)
    out.loss.backward()
    return out.noise_pred.detach(), images.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def reference(tiny_base):
    return _sds(_prior(tiny_base, RuntimeConfig(precision="fp32")))


def test_math_attention_matches_sdpa_and_no_sdpa_kernel_runs(tiny_base, reference, monkeypatch):
    prior = _prior(tiny_base, RuntimeConfig(precision="fp32", attention="math"))
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    prior._text_cache.clear()  # the text encoder's attention runs too
    eps, grad = _sds(prior)
    assert not calls, f"{len(calls)} SDPA calls with attention=math"
    # Same model, different summation order: float rounding only.
    torch.testing.assert_close(eps, reference[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, reference[1], rtol=1e-4, atol=1e-6)
    assert {type(p).__name__ for p in prior.vae.attn_processors.values()} == {"AttnProcessor"}

    configure_prior(prior, RuntimeConfig(precision="fp32", attention="sdpa"), "cpu")
    prior._text_cache.clear()
    _sds(prior)
    assert calls  # switching back uses the fused kernel again


def test_math_attention_matches_sdpa_with_a_mask():
    from idto3d.priors.adapters import _math_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (5, 7, 7))
    keep = torch.rand(2, 1, 5, 7, generator=g) > 0.3
    keep[..., 0] = True  # no fully masked row
    additive = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    for mask in (None, keep, additive):
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(_math_attention(q, k, v, mask), want, rtol=1e-5, atol=1e-6)


def test_channels_last_matches_contiguous(tiny_base, reference):
    prior = _prior(tiny_base, RuntimeConfig(precision="fp32", channels_last=True))
    for conv in (prior.unet.conv_in, prior.vae.encoder.conv_in):
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    eps, grad = _sds(prior)
    # Same fp32 arithmetic in another order: oneDNN picks its NHWC convolution algorithm (and the order of its sums)
    # by thread count and CPU, so single elements near zero can differ by more than any rtol. The whole tensor
    # differs by fp32 rounding: ~1e-7 relative per op, summed over the UNet's ~30 layers and CFG's 7.5x, well
    # below 1e-4 (measured here: eps 3.0e-6, grad 3.6e-6). A wrong layout (a transposed tensor) is O(1).
    print(f"channels-last vs contiguous, relative error: eps {_rel(eps, reference[0]):.2e}, "
          f"grad {_rel(grad, reference[1]):.2e}")
    assert _rel(eps, reference[0]) < 1e-4 and _rel(grad, reference[1]) < 1e-4
    configure_prior(prior, RuntimeConfig(precision="fp32"), "cpu")
    assert prior.unet.conv_in.weight.is_contiguous() and not prior.runtime["channels_last"]


def _half_case(tiny_base, reference, precision: str, dtype: torch.dtype, tol: float) -> None:
    prior = _prior(tiny_base, RuntimeConfig(precision=precision))
    modules = {"unet": prior.unet, "vae": prior.vae, "text": prior.text_encoder, "id_proj": prior.id_proj,
               "exp_proj": prior.exp_proj, **prior.adapter_modules()}
    assert {name: {p.dtype for p in m.parameters()} for name, m in modules.items()} == \
        {name: {dtype} for name in modules}
    eps, grad = _sds(prior)
    assert eps.dtype == torch.float32 and grad.dtype == torch.float32  # fp32 renders get fp32 gradients
    assert bool(torch.isfinite(grad).all())
    e_eps, e_grad = _rel(eps, reference[0]), _rel(grad, reference[1])
    # Half precision really ran (not a silent fp32), and stays within a few percent of fp32 after CFG's 7.5x.
    assert 1e-4 < e_eps < tol and 1e-4 < e_grad < tol, (e_eps, e_grad)


def test_bf16_noise_prediction_and_sds_gradient_are_within_a_few_percent_of_fp32(tiny_base, reference):
    _half_case(tiny_base, reference, "bf16", torch.bfloat16, 0.08)


def test_half_precision_runs_under_autocast_so_fp32_modules_still_work(tiny_base, reference):
    prior = _prior(tiny_base, RuntimeConfig(precision="bf16"))
    # Modules kept in fp32 (as diffusers keeps some) next to bf16 ones: without autocast, a bf16 input to an fp32
    # convolution is a dtype error. (Not the UNet's first parameter: Prior.dtype reads it.)
    prior.unet.conv_out.float()
    prior.vae.quant_conv.float()
    eps, grad = _sds(prior)
    assert grad.dtype == torch.float32 and _rel(grad, reference[1]) < 0.08


def _cpu_fp16_autocast() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            out = torch.nn.functional.conv2d(torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3))
        return out.dtype == torch.float16
    except (RuntimeError, TypeError):
        return False


@pytest.mark.skipif(not _cpu_fp16_autocast(), reason=f"torch {torch.__version__} has no fp16 autocast on CPU")
def test_fp16_noise_prediction_and_sds_gradient_are_within_a_few_percent_of_fp32(tiny_base, reference):
    _half_case(tiny_base, reference, "fp16", torch.float16, 0.03)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_unet_matches_eager_and_keeps_the_diffusers_model(tiny_base):
    eager = _prior(tiny_base, RuntimeConfig(precision="fp32"))
    prior = _prior(tiny_base, RuntimeConfig(precision="fp32", compile=True))
    keys = set(eager.state_dict())
    assert prior.unet._compiled_call_impl is not None
    assert set(prior.state_dict()) == keys and prior.unet.config.sample_size == eager.unet.config.sample_size
    assert list(prior.unet.attn_processors) == list(eager.unet.attn_processors)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 4, 8, 8, generator=g)
    text = torch.randn(4, 77, eager.unet.config.cross_attention_dim, generator=g)
    ids = eager.id_tokens(id_vector(0), 4)
    lam = torch.tensor([0.0, 0.0, 1.0, 1.0])  # CFG's per-sample branch weights, as guidance passes them
    with torch.no_grad():
        want = eager.predict_noise_tokens(z, 500, text, id_tokens=ids, lambda_id=lam)
        got = prior.predict_noise_tokens(z, 500, text, id_tokens=ids, lambda_id=lam)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    configure_prior(prior, RuntimeConfig(precision="fp32", compile=False), "cpu")
    assert prior.unet._compiled_call_impl is None and not prior.runtime["compile"]


def test_configure_prior_moves_every_part_and_records_what_it_applied(tiny_base):
    prior = _prior(tiny_base)
    assert prior.runtime == {}
    cfg = RuntimeConfig(device="cpu", precision="bf16", channels_last=True, attention="math")
    assert configure_prior(prior, cfg, torch.device("meta")) is prior  # an explicit device beats cfg.device
    devices = {p.device.type for p in prior.parameters()}
    assert devices == {"meta"} and prior.device.type == "meta"
    assert prior.runtime == {"device": "meta", "precision": "bf16", "requested_precision": "bf16", "autocast": True,
                             "channels_last": True, "attention": "math", "vae_attention": "AttnProcessor",
                             "text_attention": "eager", "compile": False}
    assert {p.attention for p in prior.unet.attn_processors.values()} == {"math"}
    assert runtime_summary(prior) == "meta bf16 autocast math channels-last"

    cpu = configure_prior(_prior(tiny_base), RuntimeConfig(device="cpu", precision="auto"))
    assert cpu.device.type == "cpu" and cpu.runtime["precision"] == "fp32"  # auto: fp32 on the CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_an_absent_device_is_an_error_not_a_fallback(tiny_base):
    with pytest.raises(IdtoError, match="no CUDA device"):
        configure_prior(_prior(tiny_base), RuntimeConfig(device="cuda"))


@pytest.mark.parametrize("field, value, match", [("precision", "fp8", "unknown precision"),
                                                 ("attention", "flash", "unknown runtime.attention")])
def test_bad_values_raise_and_leave_the_prior_untouched(tiny_base, field, value, match):
    prior = _prior(tiny_base)
    with pytest.raises(IdtoError, match=match):
        configure_prior(prior, RuntimeConfig(**{field: value, "channels_last": True}), "cpu")
    assert prior.runtime == {} and prior.dtype == torch.float32
    assert prior.unet.conv_in.weight.is_contiguous()
    with pytest.raises(ConfigError):
        load_config("preview", None, [f"runtime.{field}={value}"])


def test_bench_variants_parse_to_runtime_configs():
    from idto3d.bench.prior_options import parse_variants, variant_config

    assert parse_variants("math,bf16+channels_last") == ["fp32", "math", "bf16+channels_last"]
    assert variant_config("bf16+channels_last") == RuntimeConfig(precision="bf16", channels_last=True)
    assert variant_config("compile") == RuntimeConfig(precision="fp32", compile=True)
    with pytest.raises(IdtoError, match="unknown runtime variant option 'fp8'"):
        parse_variants("fp8")


@pytest.mark.slow
def test_bench_runtime_cli_rows_have_a_same_run_fp32_baseline():
    import json

    from typer.testing import CliRunner

    from idto3d.cli import app

    result = CliRunner().invoke(app, ["bench", "runtime", "--variants", "math", "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["runtime"]["attention"] for r in rows] == ["sdpa", "math"]
    assert rows[0]["ratio"] == 1.0 and rows[1]["ratio"] == pytest.approx(rows[1]["ms"] / rows[0]["ms"])
    assert all(r["ms"] > 0 and r["peak_mib"] > 0 and r["first_call_ms"] > 0 for r in rows)


def test_bench_runtime_cli_rejects_an_unknown_variant_in_one_line():
    from typer.testing import CliRunner

    from idto3d.cli import app

    result = CliRunner().invoke(app, ["bench", "runtime", "--variants", "fp8"])
    assert result.exit_code == 2 and "unknown runtime variant option 'fp8'" in result.output
