"""The identity metric of ``evaluate`` is the cosine to the *unit* mean of the reference embeddings (paper
section 4): the mean of unit vectors is shorter than 1 unless they agree, and must be normalised again before the
cosine, or every cosine shrinks by the mean's length.

Checked with references whose mean has length ~0.6, against cosines computed here by hand: on
``similarity.embed_references`` + ``cosine_and_distance``, and through ``evaluate_runs`` with a stand-in identity
backend (vectors chosen by the test; the renders and plots are real).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idto3d.evaluate.similarity import cosine_and_distance, embed_references

from cpu_threads import single_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


REF_SIZE = (40, 48)  # (W, H) of the reference photos: the renders are square, so the stand-in tells them apart
# Unit reference embeddings; their mean has length ~0.58 (far from 1).
REFS = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.6, 0.8]])
RENDER = np.array([0.5, 0.3, 0.7, 0.4]) / np.linalg.norm([0.5, 0.3, 0.7, 0.4])


def _unit_mean() -> np.ndarray:
    m = REFS.mean(0)
    assert abs(np.linalg.norm(m) - 1.0) > 0.3  # the test needs a mean far from unit length
    return m / np.linalg.norm(m)


class StandInEmbedder:
    """An identity backend returning chosen unit vectors: reference photo k (filled with value 10 k + 10) gets
    ``REFS[k]``; the i-th square image (a render) gets ``RENDER`` turned slightly by i (so no two coincide)."""

    name = "stand-in"
    threshold = 0.4

    def __init__(self) -> None:
        self.renders: list[np.ndarray] = []

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if image.shape[:2] == (REF_SIZE[1], REF_SIZE[0]):
            return REFS[int(image[0, 0, 0]) // 10 - 1].copy()
        i = len(self.renders)
        v = RENDER + 0.02 * i * np.array([0.0, 1.0, -1.0, 0.5])
        v = v / np.linalg.norm(v)
        self.renders.append(v)
        return v


def _reference_photos(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(len(REFS)):
        Image.fromarray(np.full((REF_SIZE[1], REF_SIZE[0], 3), 10 * k + 10, np.uint8)).save(folder / f"ref{k}.png")
    return folder


def test_the_reference_mean_is_renormalised_before_the_cosine(tmp_path):
    refs = embed_references([_reference_photos(tmp_path / "refs")], StandInEmbedder())
    np.testing.assert_allclose(refs.embeddings, REFS)
    np.testing.assert_allclose(np.linalg.norm(refs.mean), 1.0, rtol=1e-6,
                               err_msg="the mean of the reference embeddings is not re-normalised")
    np.testing.assert_allclose(refs.mean, _unit_mean(), rtol=1e-6)
    cos, dist = cosine_and_distance([RENDER, None], refs.mean)
    expected = float(RENDER @ _unit_mean())
    assert cos[0] == pytest.approx(expected, rel=1e-6), \
        f"cosine {cos[0]} to the references; by hand with the unit mean: {expected} (with the raw mean: " \
        f"{float(RENDER @ REFS.mean(0))})"
    assert dist[0] == pytest.approx(np.sqrt(2 - 2 * expected), rel=1e-6)
    assert np.isnan(cos[1]) and np.isnan(dist[1])


@pytest.fixture
def run_folder(tmp_path) -> Path:
    """A finished run as ``evaluate`` reads it: config.yaml and export/neutral.glb (the built-in head, grey)."""
    import torch  # noqa: F401  (the export stack imports it anyway)

    from idto3d.core.config import dump_config, load_config
    from idto3d.export import PBRMaps, export_expression, shared_atlas
    from idto3d.geometry.template import build_head_template

    root = tmp_path / "run"
    atlas = shared_atlas([build_head_template(24)])[0]
    size = 32
    maps = PBRMaps.create(np.full((size, size, 3), 0.6, np.float32), np.full((size, size), 0.6, np.float32),
                          np.zeros((size, size), np.float32))
    export_expression(root / "export", "neutral", atlas, maps)
    cfg = load_config("preview", None, ["expressions=[neutral]"])
    (root / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    return root


def test_evaluate_reports_cosines_to_the_unit_reference_mean(tmp_path, run_folder, monkeypatch):
    import sys
    import types

    import idto3d.evaluate.run as evaluate_run
    from idto3d.core.config import load_config
    from idto3d.evaluate.views import CameraGrid

    # The HTML report is another module's job.
    monkeypatch.setitem(sys.modules, "idto3d.evaluate.report", types.ModuleType("idto3d.evaluate.report"))
    embedder = StandInEmbedder()
    monkeypatch.setattr(evaluate_run, "make_embedder", lambda cfg: embedder)
    grid = CameraGrid((0.0,), (-30.0, 0.0, 30.0))
    out = evaluate_run.evaluate_runs([run_folder], [_reference_photos(tmp_path / "refs")],
                                     load_config("preview", None, ["expressions=[neutral]"]), grid=grid,
                                     resolution=64, progress=False)
    ident = out["runs"][0]["identity"]
    reported = sorted(v["cosine"] for v in ident["per_view"])
    expected = sorted(round(float(v @ _unit_mean()), 6) for v in embedder.renders[:len(grid)])
    assert len(reported) == len(grid)
    assert reported == pytest.approx(expected, abs=2e-6), \
        f"evaluate's per-view cosines {reported}; by hand with the unit reference mean: {expected} (with the raw " \
        f"mean: {sorted(round(float(v @ REFS.mean(0)), 6) for v in embedder.renders[:len(grid)])})"
    assert ident["cosine"]["mean"] == pytest.approx(float(np.mean(expected)), abs=2e-6)
