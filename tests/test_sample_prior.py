"""sample-prior: DDIM samples of a prior folder as a grid; rows follow the identity only through the ID branch."""

from __future__ import annotations

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from idto3d.cli.app import app
from idto3d.identity.io import save_identity
from idto3d.priors.prior import save_prior
from idto3d.stages.synth_identity import synthetic_identity
from priors_fixtures import id_vector, isolated_cache, prior, randomize_adapters, tiny_base  # noqa: F401


def _grid(args: list[str]) -> np.ndarray:
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return np.asarray(Image.open(args[args.index("-o") + 1]), dtype=np.int16)


def test_samples_are_deterministic_and_follow_the_identity_only_through_its_branch(prior, tmp_path):  # noqa: F811
    randomize_adapters(prior)
    save_prior(prior, tmp_path / "prior")
    for k in range(2):
        save_identity(tmp_path / f"id{k}.safetensors", synthetic_identity(id_vector(k, 40)))
    base = ["sample-prior", str(tmp_path / "prior"), "--identity", str(tmp_path / "id0.safetensors"), "--identity",
            str(tmp_path / "id1.safetensors"), "--expression", "neutral", "--expression", "smile", "--steps", "3"]
    a = _grid([*base, "-o", str(tmp_path / "a.png")])
    size = prior.resolution
    assert a.shape == (2 * (size + 2), 2 * (size + 2), 3)
    assert np.array_equal(a, _grid([*base, "-o", str(tmp_path / "b.png")]))
    off = _grid([*base, "--lambda-id", "0", "-o", str(tmp_path / "c.png")])
    assert np.abs(off - a).max() > 0  # the ID tokens change the samples
    # with the ID branch off, the identity file cannot matter: swapping the two identities changes nothing
    swapped = ["sample-prior", str(tmp_path / "prior"), "--identity", str(tmp_path / "id1.safetensors"),
               "--identity", str(tmp_path / "id0.safetensors"), "--expression", "neutral", "--expression", "smile",
               "--steps", "3", "--lambda-id", "0"]
    assert np.array_equal(off, _grid([*swapped, "-o", str(tmp_path / "d.png")]))
    assert not np.array_equal(a, _grid([*swapped[:-2], "-o", str(tmp_path / "e.png")]))
    # the ID-only guidance term moves the samples, and vanishes with the ID branch off (nothing to extrapolate)
    # (up to float noise: the term adds a part to the batched UNet call, which sums in another order)
    moved = np.abs(_grid([*base, "--id-guidance", "2", "-o", str(tmp_path / "f.png")]) - a).max()
    vanished = np.abs(_grid([*base, "--lambda-id", "0", "--id-guidance", "2", "-o", str(tmp_path / "g.png")]) - off)
    assert vanished.max() <= 1 < moved, (vanished.max(), moved)
    assert np.abs(_grid([*base, "--exp-guidance", "2", "-o", str(tmp_path / "h.png")]) - a).max() > 0
