"""Paper eq. 3: the self-attention LoRA adapts Q, K *and* V (``Q^n = X W_Q + X W_Q^n`` and likewise K and V).

Checked on the tiny SD1.5-architecture UNet: every self-attention layer carries a LoRA on each of to_q, to_k and
to_v; one layer's output equals attention written out here with all three deltas; and V's LoRA alone changes the
UNet's noise prediction.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from idto3d.priors.adapters import LoRALinear, LoRASelfAttnProcessor, install_adapters
from idto3d.priors.tiny import tiny_unet_config

from cpu_threads import single_thread  # noqa: F401  (fixture)
from priors_fixtures import attention_layers, isolated_cache, prior, tiny_base  # noqa: F401  (fixtures)

RANK = 4


pytestmark = pytest.mark.usefixtures("single_thread")


def _self_attention_layers(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module, object]]:
    """(name, attention module, processor) of every self-attention layer (diffusers' ``attn1``)."""
    return attention_layers(unet, cross=False)


def _fresh_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_unet_config())


def _lora_delta(lora: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x @ lora.down.weight.T @ lora.up.weight.T


def _randomise(lora: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_every_self_attention_layer_has_a_lora_on_q_k_and_v():
    unet = _fresh_unet()
    install_adapters(unet, RANK, 8)
    layers = _self_attention_layers(unet)
    assert len(layers) == 16  # SD1.5's layout
    for name, attn, proc in layers:
        assert isinstance(proc, LoRASelfAttnProcessor), name
        for which, base in (("q", attn.to_q), ("k", attn.to_k), ("v", attn.to_v)):
            lora = getattr(proc, f"to_{which}_lora", None)
            assert isinstance(lora, LoRALinear), f"{name}: to_{which} has no LoRA"
            assert lora.down.weight.shape == (RANK, base.in_features), (name, which)
            assert lora.up.weight.shape == (base.out_features, RANK), (name, which)
            assert lora.down.weight.requires_grad and lora.up.weight.requires_grad


def test_a_self_attention_layer_adds_each_lora_to_its_projection():
    """One layer's output against multi-head attention written out with Q, K and V each plus its LoRA delta."""
    unet = _fresh_unet()
    install_adapters(unet, RANK, 8)
    name, attn, proc = _self_attention_layers(unet)[0]
    for i, which in enumerate("qkv"):
        _randomise(getattr(proc, f"to_{which}_lora"), seed=10 + i)
    proc.attention = "math"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, attn.to_q.in_features, generator=g)

    def by_hand() -> torch.Tensor:
        q = attn.to_q(x) + _lora_delta(proc.to_q_lora, x)
        k = attn.to_k(x) + _lora_delta(proc.to_k_lora, x)
        v = attn.to_v(x) + _lora_delta(proc.to_v_lora, x)
        b, n, c = q.shape
        h = attn.heads
        split = lambda t: t.view(b, -1, h, c // h).transpose(1, 2)  # noqa: E731
        w = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (c // h) ** 0.5, dim=-1)
        out = (w @ split(v)).transpose(1, 2).reshape(b, n, c)
        return attn.to_out[0](out)

    with torch.no_grad():
        got, want = attn(x), by_hand()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name}: not Q, K and V each plus its LoRA (eq. 3)\n{m}")
        # V's delta alone: changing only V's LoRA changes the layer's output, as the formula says.
        _randomise(proc.to_v_lora, seed=99)
        got_v, want_v = attn(x), by_hand()
    torch.testing.assert_close(got_v, want_v, rtol=1e-4, atol=1e-5,
                               msg=lambda m: f"{name}: V's LoRA is not applied as in eq. 3\n{m}")
    assert not torch.allclose(got_v, got, atol=1e-5), f"{name}: changing V's LoRA did not change the output"


def test_v_lora_alone_changes_the_priors_noise_prediction(prior):  # noqa: F811
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 8, 8, generator=g)
    text = prior.encode_text(["a front view normal map face portrait of a man"])
    with torch.no_grad():
        before = prior.predict_noise(z, 500, text)
        for i, (name, _, proc) in enumerate(_self_attention_layers(prior.unet)):
            _randomise(proc.to_v_lora, seed=i)
        after = prior.predict_noise(z, 500, text)
    change = float((after - before).abs().max())
    assert change > 1e-4, f"the self-attention V LoRA has no effect on the prior's output (max change {change})"
    assert torch.isfinite(after).all()


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_each_self_attention_lora_is_trained(prior, which):  # noqa: F811
    """Each of the three LoRAs is among the trainable parameters and receives a gradient."""
    trainable = {id(p) for p in prior.trainable_parameters()}
    layers = _self_attention_layers(prior.unet)
    for name, _, proc in layers:
        lora = getattr(proc, f"to_{which}_lora")
        assert {id(p) for p in lora.parameters()} <= trainable, f"{name}: to_{which} LoRA is not trained"
    # The zero-initialised ``up`` gets a gradient through the layer's output once ``down`` is non-zero.
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 8, 8, generator=g)
    text = prior.encode_text(["a face"])
    out = prior.predict_noise(z, 300, text)
    out.square().mean().backward()
    grads = [getattr(proc, f"to_{which}_lora").up.weight.grad for _, _, proc in layers]
    assert all(gr is not None for gr in grads), f"to_{which} LoRA got no gradient"
    assert sum(float(gr.abs().sum()) for gr in grads) > 0, f"to_{which} LoRA's gradient is zero everywhere"
