"""Synthetic scans: the offline merge of random face-model shapes, in the NPHM layout render-dataset reads."""

from __future__ import annotations

import json

import pytest
import torch
import trimesh
from typer.testing import CliRunner

from idto3d.cli.app import app
from idto3d.core.expressions import EXPRESSION_NAMES
from idto3d.priors.training.render_dataset import find_scans, read_subject_metadata
from idto3d.stages.synth_scans import SynthScansError, synth_scans


RES = 48  # a coarse built-in template keeps these tests quick; the CLI uses the offline path's default


def _verts(path) -> torch.Tensor:
    return torch.from_numpy(trimesh.load(path, process=False).vertices).float()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synth_scans(out, subjects=2, expressions=["neutral", "mouth_open"], seed=5, template_resolution=RES)
    return out


def test_layout_is_what_render_dataset_reads(made):
    entries = find_scans(made)
    assert [(e.subject, e.expression) for e in entries] == [
        ("000", "neutral"), ("000", "mouth_open"), ("001", "neutral"), ("001", "mouth_open")]
    assert entries[1].expression_id == f"{EXPRESSION_NAMES.index('mouth_open'):03d}"
    assert set(read_subject_metadata(made / "subjects.csv")) == {"0", "1"}
    scan = trimesh.load(entries[0].path, process=False)
    assert scan.is_watertight and scan.visual.kind == "vertex"
    rgb = scan.visual.vertex_colors[:, :3].astype(float)
    assert rgb.std(0).max() > 2  # a tone with variation (and lips), not one flat colour


def test_subjects_differ_and_expression_moves_only_the_face(made):
    n0, o0 = _verts(made / "000/000/scan.ply"), _verts(made / "000/020/scan.ply")
    n1 = _verts(made / "001/000/scan.ply")
    assert n0.shape == n1.shape == o0.shape  # template topology throughout
    assert (n0 - n1).norm(dim=1).max() > 0.02  # two random shapes are two heads
    moved = (o0 - n0).norm(dim=1)
    assert moved.max() > 0.02  # the mouth opens
    front, back = n0[:, 2] > 0.3, n0[:, 2] < -0.3
    # ... in the face: the back of the head stays put
    assert moved[back].max() < 0.2 * moved[front].max()
    lower = n0[:, 1][moved.argmax()] < n0[front][:, 1].mean()
    assert lower  # the largest motion is in the lower face (jaw/lips), not the brows


def test_deterministic_per_subject_and_resumes(made, tmp_path):
    # One subject made alone, starting at index 1, is byte-identical to subject 1 of the pair.
    synth_scans(tmp_path, subjects=1, first=1, expressions=["neutral", "mouth_open"], seed=5,
                template_resolution=RES)
    assert (tmp_path / "001/000/scan.ply").read_bytes() == (made / "001/000/scan.ply").read_bytes()
    codes = json.loads((made / "synth.json").read_text())["subjects"]
    assert codes["001"]["shape"] == json.loads((tmp_path / "synth.json").read_text())["subjects"]["001"]["shape"]
    again = synth_scans(tmp_path, subjects=1, first=1, expressions=["neutral", "mouth_open"], seed=5,
                        template_resolution=RES)
    assert (again.written, again.skipped) == (0, 2)
    with pytest.raises(SynthScansError, match="other settings"):
        synth_scans(tmp_path, subjects=1, seed=6, template_resolution=RES)


def test_cli_bad_expression_is_one_error_line(tmp_path):
    res = CliRunner().invoke(app, ["synth-scans", str(tmp_path / "s"), "--subjects", "1", "--expressions",
                                   "neutral,cheek_blowing"])
    assert res.exit_code == 2
    assert "error: the face model cannot show 'cheek_blowing'" in res.output


# --- identities of synthetic subjects ----------------------------------------------------------------------


def test_separation_tells_clean_from_mixed_clusters():
    import numpy as np

    from idto3d.stages.synth_identity import separation

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16))

    def views(c, spread):
        v = c + spread * rng.normal(size=(4, 16))
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    clean = separation({str(i): views(c, 0.05) for i, c in enumerate(centres)})
    assert clean.separates and clean.nearest_correct == 1.0 and clean.between_min > clean.within_max
    mixed = separation({str(i): views(centres[0], 0.5) for i in range(3)})  # three "subjects", one face
    assert not mixed.separates and mixed.nearest_correct < 1.0


def test_synthetic_identity_is_a_deterministic_projection_of_the_shape(made, tmp_path):
    from idto3d.core.config import load_config
    from idto3d.identity.io import load_identity
    from idto3d.stages.synth_identity import synth_identities, synthetic_identity
    from idto3d.stages.synth_scans import shape_codes

    codes = shape_codes(made)
    a, b = synthetic_identity(codes["000"]), synthetic_identity(codes["000"])
    assert torch.equal(a.embedding, b.embedding) and a.dim == 128
    assert abs(float(a.embedding.norm()) - 1) < 1e-5
    near = synthetic_identity(codes["000"] + 0.05 * torch.randn(codes["000"].shape, generator=torch.Generator().manual_seed(1)))
    other = synthetic_identity(codes["001"])
    assert (a.embedding - near.embedding).norm() < (a.embedding - other.embedding).norm()
    assert synth_identities(made, tmp_path, load_config(), backend="synthetic") is None
    back = load_identity(tmp_path / "001.safetensors")
    assert back.backend == "synthetic" and torch.allclose(back.embedding, other.embedding)
