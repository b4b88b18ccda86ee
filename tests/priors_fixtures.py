"""Shared fixtures for the priors tests: one tiny SD1.5-architecture base model per session, and an
expression cache isolated per test. Import the fixtures by name into a test module to use them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from idto3d.priors.prior import Prior, build_prior
from idto3d.priors.tiny import make_tiny_base_model

ID_DIM = 128


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_base_model(tmp_path_factory.mktemp("tiny") / "sd", seed=0)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("IDTO3D_CACHE", str(cache))
    return cache


@pytest.fixture
def prior(tiny_base: Path) -> Prior:
    return build_prior(tiny_base, "normal", ID_DIM, seed=0)


def randomize_adapters(prior: Prior, seed: int = 1) -> None:
    """Give every adapter weight (zero-initialised LoRA ``up`` included) random values, so a test can tell
    trained-looking adapters apart from fresh ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prior.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + p)


def id_vector(seed: int, dim: int = ID_DIM) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0)


def attention_layers(unet: torch.nn.Module, cross: bool) -> list[tuple[str, torch.nn.Module, object]]:
    """(processor name, attention module, processor) of every cross- (``attn2``) or self-attention (``attn1``)
    layer of ``unet``."""
    out = []
    for name, proc in unet.attn_processors.items():
        attn = unet.get_submodule(name.removesuffix(".processor"))
        if attn.is_cross_attention == cross:
            out.append((name, attn, proc))
    return out
