"""Claims about building, saving and loading priors, and the tiny base model the tests stand on."""

import json
from pathlib import Path

import pytest
import torch

from idto3d.core.errors import IdtoError
from idto3d.priors.prior import build_prior, load_prior, save_prior
from priors_fixtures import ID_DIM, id_vector, isolated_cache, prior, randomize_adapters, tiny_base  # noqa: F401


def test_tiny_base_model_is_an_sd15_layout_folder_with_in_vocabulary_special_tokens(tiny_base: Path):
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_base / sub).is_dir()
    index = json.loads((tiny_base / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (tiny_base / "tokenizer").iterdir()}
    vocab = json.loads((tiny_base / "tokenizer" / "vocab.json").read_text())
    text_cfg = json.loads((tiny_base / "text_encoder" / "config.json").read_text())
    assert text_cfg["vocab_size"] == len(vocab)
    assert text_cfg["bos_token_id"] == vocab["<|startoftext|>"] and text_cfg["eos_token_id"] == vocab["<|endoftext|>"]


def test_tiny_prior_has_sd15_structure_at_about_a_million_parameters(prior):
    n = sum(p.numel() for p in prior.unet.parameters() if not p.requires_grad)
    assert 0.5e6 < n < 2e6
    assert prior.vae_scale_factor == 8 and prior.unet.config.in_channels == 4
    words = prior.tokenizer.tokenize("a front view normal map face portrait")
    assert len(words) == 7  # the prompt words are whole tokens


def test_build_is_deterministic_under_a_seed(tiny_base: Path):
    a = build_prior(tiny_base, "albedo", ID_DIM, seed=3).adapter_state_dict()
    b = build_prior(tiny_base, "albedo", ID_DIM, seed=3).adapter_state_dict()
    c = build_prior(tiny_base, "albedo", ID_DIM, seed=4).adapter_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_save_load_round_trip_is_bit_identical(prior, tmp_path: Path):
    randomize_adapters(prior)
    save_prior(prior, tmp_path / "normal_prior")
    assert {p.name for p in (tmp_path / "normal_prior").iterdir()} == {"prior_config.json", "adapters.safetensors"}
    loaded = load_prior(tmp_path / "normal_prior")
    assert loaded.spec == prior.spec
    want, got = prior.adapter_state_dict(), loaded.adapter_state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = prior.encode_text(["a side view normal map face portrait"])
    exp = prior.encode_expressions(["surprise"])
    with torch.no_grad():
        a = prior.predict_noise(z, 321, text, id_vector(5), exp)
        b = loaded.predict_noise(z, 321, text, id_vector(5), exp)
    assert torch.equal(a, b)


def test_load_can_point_at_a_moved_base_model(prior, tiny_base: Path, tmp_path: Path):
    save_prior(prior, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "prior_config.json").read_text())
    cfg["base_model"] = str(tmp_path / "was_on_another_machine")
    (tmp_path / "p" / "prior_config.json").write_text(json.dumps(cfg))
    with pytest.raises(IdtoError, match="base model folder not found"):
        load_prior(tmp_path / "p")
    assert load_prior(tmp_path / "p", base_model=tiny_base).spec.base_model == str(tiny_base.resolve())


def test_missing_or_foreign_prior_folder_is_a_clear_error(tmp_path: Path):
    with pytest.raises(IdtoError, match="prior folder not found"):
        load_prior(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IdtoError, match="no prior_config.json"):
        load_prior(tmp_path / "empty")


def test_absent_base_model_offline_says_what_to_download(tmp_path: Path):
    # Loading is always local_files_only, so this never touches the network.
    with pytest.raises(IdtoError, match=r"huggingface-cli download someone/not-here.*prior.base_model"):
        build_prior("someone/not-here", "normal", 512)
    with pytest.raises(IdtoError, match="base model folder not found"):
        build_prior(tmp_path / "no_such_folder", "normal", 512)


def test_base_folder_missing_a_component_names_it(tiny_base: Path, tmp_path: Path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_base, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(IdtoError, match="no loadable vae/"):
        build_prior(broken, "normal", ID_DIM)


def test_unknown_domain_is_refused(tiny_base: Path):
    with pytest.raises(IdtoError, match="unknown prior domain 'depth'"):
        build_prior(tiny_base, "depth", ID_DIM)


def test_identity_dim_reads_the_identity_files_embedding_size(tmp_path: Path):
    from safetensors.torch import save_file

    from idto3d.priors.prior import identity_dim

    save_file({"embedding": torch.zeros(512), "embeddings": torch.zeros(2, 512)}, tmp_path / "a.safetensors",
              metadata={"format": "idto3d.identity/1", "backend": "arcface", "dim": "512"})
    assert identity_dim(tmp_path / "a.safetensors") == 512
    with pytest.raises(IdtoError, match="identity file not found"):
        identity_dim(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(IdtoError, match="is not an identity file"):
        identity_dim(tmp_path / "bad.safetensors")
