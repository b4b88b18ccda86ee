"""The decoupled ID (and expression) key/value projections start as copies of the layer's text K/V, as
IP-Adapter initialises ``to_k_ip``/``to_v_ip`` from ``to_k``/``to_v``: a fresh branch then attends like the text
branch does. Copies, not shared tensors: training the new branch must leave the frozen text K/V alone.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from idto3d.priors.adapters import DecoupledCrossAttnProcessor, install_adapters
from idto3d.priors.tiny import tiny_unet_config

from cpu_threads import single_thread  # noqa: F401  (fixture)
from priors_fixtures import attention_layers, isolated_cache, prior, tiny_base  # noqa: F401  (fixtures)


pytestmark = pytest.mark.usefixtures("single_thread")


def _cross_layers(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module, DecoupledCrossAttnProcessor]]:
    out = attention_layers(unet, cross=True)
    for name, _, proc in out:
        assert isinstance(proc, DecoupledCrossAttnProcessor), name
    assert len(out) == 16  # SD1.5's layout
    return out


def _check_copies(unet: torch.nn.Module) -> None:
    for name, attn, proc in _cross_layers(unet):
        for branch in ("id", "exp"):
            for kv in ("k", "v"):
                new = getattr(proc, f"to_{kv}_{branch}").weight
                text = getattr(attn, f"to_{kv}").weight
                same = torch.equal(new, text)
                assert same, f"{name}: to_{kv}_{branch} does not start as a copy of the text to_{kv} " \
                             f"(IP-Adapter's init); max difference {float((new - text).abs().max()):.4g}"
                assert new.data_ptr() != text.data_ptr(), f"{name}: to_{kv}_{branch} shares the text to_{kv}'s tensor"
        # Keys and values differ in the base, so a swapped copy would show.
        assert not torch.equal(attn.to_k.weight, attn.to_v.weight)


def test_install_adapters_copies_the_text_kv_into_the_id_and_expression_kv():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config())
    install_adapters(unet, 4, 8)
    _check_copies(unet)


def test_a_built_prior_starts_with_id_kv_equal_to_the_text_kv(prior):  # noqa: F811
    _check_copies(prior.unet)


def test_training_the_id_kv_leaves_the_text_kv_unchanged(prior):  # noqa: F811
    name, attn, proc = _cross_layers(prior.unet)[0]
    text_k = attn.to_k.weight.detach().clone()
    with torch.no_grad():
        proc.to_k_id.weight.add_(1.0)
    assert torch.equal(attn.to_k.weight, text_k), f"{name}: the ID K is the text K itself, not a copy"
