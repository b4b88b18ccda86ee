"""Claims about the expression conditioning: the 23 descriptors' CLIP embeddings, computed with the base
model's own text encoder and cached on disk per model."""

from pathlib import Path

import pytest
import torch

import idto3d.core.expressions as ex
import idto3d.priors.expression_embeddings as emb
from idto3d.core.errors import IdtoError
from idto3d.priors.prior import build_prior
from idto3d.priors.tiny import make_tiny_base_model
from priors_fixtures import ID_DIM, isolated_cache, prior, tiny_base  # noqa: F401


def test_unknown_expression_names_get_a_clear_error_with_a_hint(prior):
    with pytest.raises(IdtoError, match=r"unknown expression 'smiel' \(did you mean 'smile'\?\)"):
        prior.encode_expressions(["neutral", "smiel"])
    with pytest.raises(ValueError):  # callers that catch ValueError (config) keep working
        ex.get_expression("nope")


def test_expression_embedding_is_the_pooled_clip_output_of_its_descriptor(prior):
    emb = prior.encode_expressions(["neutral", "lip_roll", "Mouth-Open"])
    assert emb.shape == (3, prior.text_encoder.config.hidden_size)
    ids = prior.tokenizer([ex.get_expression("lip_roll").descriptor], padding="max_length", max_length=77,
                          truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        want = prior.text_encoder(ids).pooler_output[0]
    torch.testing.assert_close(emb[1], want)
    assert len({tuple(e.tolist()) for e in prior.expression_table()}) == len(ex.EXPRESSIONS)


def test_embeddings_are_cached_per_model(prior, tiny_base: Path, isolated_cache: Path, monkeypatch, tmp_path):
    first = prior.encode_expressions(["smile"])
    files = list((isolated_cache / "expressions").glob("*.safetensors"))
    assert len(files) == 1

    def no_compute(*a, **k):
        raise AssertionError("recomputed despite a cache entry")

    monkeypatch.setattr(emb, "_compute", no_compute)
    again = build_prior(tiny_base, "normal", ID_DIM)  # a fresh prior reads the file
    assert torch.equal(again.encode_expressions(["smile"]), first)
    monkeypatch.undo()
    monkeypatch.setenv("IDTO3D_CACHE", str(isolated_cache))

    other = build_prior(make_tiny_base_model(tmp_path / "other", seed=1), "normal", ID_DIM)
    assert not torch.equal(other.encode_expressions(["smile"]), first)
    assert len(list((isolated_cache / "expressions").glob("*.safetensors"))) == 2


def test_corrupt_cache_entry_is_recomputed(prior, isolated_cache: Path):
    want = prior.expression_table().clone()
    (path,) = (isolated_cache / "expressions").glob("*.safetensors")
    path.write_bytes(b"garbage")
    got = emb.expression_embeddings(prior.text_encoder, prior.tokenizer)
    assert torch.equal(got, want)
    assert path.stat().st_size > 100


def test_cache_dir_follows_idto3d_cache(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("IDTO3D_CACHE", str(tmp_path / "c"))
    assert emb.expression_cache_dir() == tmp_path / "c" / "expressions"
    monkeypatch.delenv("IDTO3D_CACHE")
    assert emb.expression_cache_dir() == Path.home() / ".cache" / "idto3d" / "expressions"
