"""Claims about the adapters (paper eqs. 3-4, section B): LoRA on self-attention, decoupled ID/expression
cross-attention, only adapters train, the parameter count, and IP-Adapter-FaceID checkpoints."""

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from idto3d.core.errors import IdtoError
from idto3d.priors.adapters import (
    DecoupledCrossAttnProcessor, LoRASelfAttnProcessor, adapter_parameter_breakdown, install_adapters,
)
from priors_fixtures import ID_DIM, id_vector, isolated_cache, prior, randomize_adapters, tiny_base  # noqa: F401


def _inputs(prior, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 4, 8, 8, generator=g)
    text = prior.encode_text(["a front view normal map face portrait of a man"] * b)
    return z, text


def test_every_attention_layer_gets_its_adapter_with_the_paper_ranks(prior):
    procs = prior.unet.attn_processors
    selfs = [p for p in procs.values() if isinstance(p, LoRASelfAttnProcessor)]
    crosses = [p for p in procs.values() if isinstance(p, DecoupledCrossAttnProcessor)]
    assert len(selfs) == len(crosses) == 16 and len(procs) == 32  # SD1.5's layout
    cross_dim = prior.unet.config.cross_attention_dim
    for name, p in procs.items():
        attn = prior.unet.get_submodule(name.removesuffix(".processor"))
        h = attn.to_q.out_features
        if isinstance(p, LoRASelfAttnProcessor):
            assert p.to_q_lora.down.weight.shape == (16, h) and p.to_v_lora.up.weight.shape == (h, 16)
        else:
            assert p.to_k_lora.down.weight.shape == (32, cross_dim) and p.to_q_lora.up.weight.shape == (h, 32)
            assert p.to_k_id.weight.shape == p.to_v_exp.weight.shape == (h, cross_dim)
    ids = prior.id_proj(torch.randn(3, ID_DIM))
    exps = prior.exp_proj(torch.randn(3, prior.spec.exp_dim))
    assert ids.shape == (3, 4, cross_dim) and exps.shape == (3, 4, cross_dim)


def test_zero_lambdas_and_fresh_lora_reproduce_the_unadapted_unet_exactly(prior, tiny_base):
    base = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet", local_files_only=True)
    z, text = _inputs(prior)
    exp = prior.encode_expressions(["smile", "anger"])
    with torch.no_grad():
        want = base(z, 500, encoder_hidden_states=text).sample
        got = prior.predict_noise(z, 500, text, id_vector(0), exp, lambda_id=0.0, lambda_exp=0.0)
        no_cond = prior.predict_noise(z, 500, text)
    assert torch.equal(got, want)
    assert torch.equal(no_cond, want)


def test_id_embedding_changes_the_output_only_when_lambda_id_is_positive(prior):
    z, text = _inputs(prior)
    with torch.no_grad():
        a = prior.predict_noise(z, 400, text, id_vector(1), lambda_id=1.0)
        b = prior.predict_noise(z, 400, text, id_vector(2), lambda_id=1.0)
        a0 = prior.predict_noise(z, 400, text, id_vector(1), lambda_id=0.0)
        b0 = prior.predict_noise(z, 400, text, id_vector(2), lambda_id=0.0)
        prior.set_scales(lambda_id=0.0)  # the run-time default, not just the per-call override
        a_default = prior.predict_noise(z, 400, text, id_vector(1))
    assert (a - b).abs().max() > 1e-4
    assert torch.equal(a0, b0) and torch.equal(a_default, a0)


def test_expression_embedding_changes_the_output_only_when_lambda_exp_is_positive(prior):
    z, text = _inputs(prior, b=1)
    smile, anger = prior.encode_expressions(["smile"]), prior.encode_expressions(["anger"])
    with torch.no_grad():
        outs = {(lam, n): prior.predict_noise(z, 300, text, exp_embedding=e, lambda_exp=lam)
                for lam in (0.0, 1.0) for n, e in (("smile", smile), ("anger", anger))}
    assert (outs[1.0, "smile"] - outs[1.0, "anger"]).abs().max() > 1e-4
    assert torch.equal(outs[0.0, "smile"], outs[0.0, "anger"])


def test_per_sample_lambdas_match_separate_calls(prior):
    # Classifier-free guidance runs the unconditional and conditional halves in one call this way.
    randomize_adapters(prior)
    z, text = _inputs(prior, b=2)
    ids = torch.stack([id_vector(3), id_vector(3)])
    with torch.no_grad():
        both = prior.predict_noise(z, 250, text, ids, lambda_id=torch.tensor([0.0, 0.7]))
        off = prior.predict_noise(z[:1], 250, text[:1])
        on = prior.predict_noise(z[1:], 250, text[1:], ids[1:], lambda_id=0.7)
    torch.testing.assert_close(both, torch.cat([off, on]), rtol=1e-5, atol=1e-5)


def test_only_adapter_parameters_train(prior):
    trainable = {id(p) for p in prior.trainable_parameters()}
    assert trainable == {id(p) for p in prior.parameters() if p.requires_grad}
    z, text = _inputs(prior, b=1)
    loss = prior.predict_noise(z, 500, text, id_vector(0), prior.encode_expressions(["grin"])).square().mean()
    loss.backward()
    grads = {id(p) for p in prior.parameters() if p.grad is not None}
    assert grads and grads <= trainable
    assert prior.id_proj.ff.net[0].proj.weight.grad is not None  # the ID branch is on the graph


def _sd15_adapter_count(cfg: dict, id_dim: int, exp_dim: int, r_self=16, r_cross=32, tokens=4) -> dict:
    """The analytic count, from the paper's description: one transformer block per attention layer."""
    ch, c = cfg["block_out_channels"], cfg["cross_attention_dim"]
    n = cfg["layers_per_block"]
    widths = [ch[i] for i in range(3) for _ in range(n)] + [ch[-1]] \
        + [list(reversed(ch))[i] for i in range(1, 4) for _ in range(n + 1)]
    assert len(widths) == 16
    return {
        "self_attn_lora": sum(3 * r_self * (h + h) for h in widths),
        "cross_attn_lora": sum(r_cross * ((h + h) + 2 * (c + h)) for h in widths),
        "id_kv": sum(2 * c * h for h in widths),
        "exp_kv": sum(2 * c * h for h in widths),
        "id_proj": (id_dim * 2 * id_dim + 2 * id_dim) + (2 * id_dim * tokens * c + tokens * c) + 2 * c,
        "exp_proj": (exp_dim * tokens * c + tokens * c) + 2 * c,
    }


def test_full_size_sd15_adapter_count_equals_the_analytic_formula():
    from accelerate import init_empty_weights
    from diffusers.models.embeddings import ImageProjection, IPAdapterFaceIDImageProjection

    from idto3d.priors.tiny import sd15_unet_config

    cfg = sd15_unet_config()
    with init_empty_weights():  # shapes only: no 3.4 GB of random weights
        unet = UNet2DConditionModel(**cfg)
        install_adapters(unet, 16, 32)
        id_proj = IPAdapterFaceIDImageProjection(512, 768, mult=2, num_tokens=4)
        exp_proj = ImageProjection(768, 768, 4)
    got = adapter_parameter_breakdown(unet, id_proj, exp_proj)
    want = _sd15_adapter_count(cfg, id_dim=512, exp_dim=768)
    assert {k: got[k] for k in want} == want
    assert got["base_unet"] == 859_520_964  # SD1.5's UNet
    assert got["fraction"] == pytest.approx(sum(want.values()) / (got["base_unet"] + sum(want.values())))


def _faceid_state(prior, seed=0, id_dim=ID_DIM):
    """An ip-adapter-faceid_sd15-shaped state for this prior's UNet (random weights, its key layout)."""
    g = torch.Generator().manual_seed(seed)
    c, n = prior.unet.config.cross_attention_dim, prior.spec.id_tokens
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    image_proj = {"proj.0.weight": rnd(2 * id_dim, id_dim), "proj.0.bias": rnd(2 * id_dim),
                  "proj.2.weight": rnd(n * c, 2 * id_dim), "proj.2.bias": rnd(n * c),
                  "norm.weight": rnd(c), "norm.bias": rnd(c)}
    ip = {}
    for i, (name, p) in enumerate(prior.unet.attn_processors.items()):
        attn = prior.unet.get_submodule(name.removesuffix(".processor"))
        h, k_in = attn.to_q.out_features, attn.to_k.in_features
        ip[f"{i}.to_q_lora.down.weight"] = rnd(128, h)  # FaceID's own LoRA: ignored
        ip[f"{i}.to_q_lora.up.weight"] = rnd(h, 128)
        if isinstance(p, DecoupledCrossAttnProcessor):
            ip[f"{i}.to_k_ip.weight"] = rnd(h, k_in)
            ip[f"{i}.to_v_ip.weight"] = rnd(h, k_in)
    return {"image_proj": image_proj, "ip_adapter": ip}


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_ip_adapter_faceid_checkpoint_loads_into_the_id_branch(prior, tmp_path: Path, fmt):
    state = _faceid_state(prior)
    path = tmp_path / f"ip-adapter-faceid_sd15.{fmt}"
    if fmt == "bin":
        torch.save(state, path)
    else:
        save_file({f"{group}.{k}": v for group, sd in state.items() for k, v in sd.items()}, path)
    report = prior.load_ip_adapter_faceid(path)
    assert report["ignored_lora"] == 64
    proj = prior.id_proj
    assert torch.equal(proj.ff.net[0].proj.weight, state["image_proj"]["proj.0.weight"])
    assert torch.equal(proj.ff.net[2].bias, state["image_proj"]["proj.2.bias"])
    assert torch.equal(proj.norm.weight, state["image_proj"]["norm.weight"])
    crosses = 0
    for i, p in enumerate(prior.unet.attn_processors.values()):
        if isinstance(p, DecoupledCrossAttnProcessor):
            crosses += 1
            assert torch.equal(p.to_k_id.weight, state["ip_adapter"][f"{i}.to_k_ip.weight"])
            assert torch.equal(p.to_v_id.weight, state["ip_adapter"][f"{i}.to_v_ip.weight"])
            assert i % 2 == 1  # diffusers' numbering: cross-attention processors are the odd ones
    assert crosses == 16


def test_faceid_checkpoint_for_another_id_size_is_refused_naming_both(prior, tmp_path: Path):
    path = tmp_path / "arcface.bin"
    torch.save(_faceid_state(prior, id_dim=512), path)
    with pytest.raises(IdtoError, match=r"512-D .* 128-D"):
        prior.load_ip_adapter_faceid(path)


def test_not_an_ip_adapter_checkpoint_is_refused(prior, tmp_path: Path):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, path)
    with pytest.raises(IdtoError, match="not an IP-Adapter checkpoint"):
        prior.load_ip_adapter_faceid(path)
    with pytest.raises(IdtoError, match="not found"):
        prior.load_ip_adapter_faceid(tmp_path / "missing.bin")


def test_wrong_sized_identity_embedding_is_refused_naming_both_sizes(prior):
    z, text = _inputs(prior, b=1)
    with pytest.raises(IdtoError, match=r"512 \(ArcFace\).*128 \(dlib\)"):
        prior.predict_noise(z, 500, text, id_vector(0, dim=512))
