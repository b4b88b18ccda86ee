"""The stitched offline head (``geometry.head_stitch``) does not cross itself at the face/body seam: no pair of
triangles around the seam (the body, the zipper, the face's outer band) intersects, on the mean face, bald and
with the hair shell (``geometry.hair_shell``), in every offline expression. The astronaut's run is checked in
``tests/test_pipeline_offline.py``."""

from __future__ import annotations

import pytest

from idto3d.face_model.offline_expressions import OFFLINE_EXPRESSIONS

from mesh_checks import seam_crossings, stitched_with_layout


@pytest.fixture(scope="module")
def mean_face():
    from idto3d.face_model.morphable_model import load_morphable_model
    from idto3d.geometry.face_merge import placement
    from idto3d.geometry.template import build_head_template

    model = load_morphable_model()
    return model, None, placement(model.mean, model.landmarks), build_head_template(64), list(OFFLINE_EXPRESSIONS)


@pytest.mark.slow
@pytest.mark.parametrize("hair", [False, True], ids=["bald", "hair_shell"])
def test_the_seam_does_not_cross_itself_in_any_expression(mean_face, hair, monkeypatch):
    from test_hair_shell import _scalp

    (heads, *_), layout = stitched_with_layout(monkeypatch, *mean_face, scalp=_scalp if hair else None)
    crossings = seam_crossings(heads, layout)
    print(f"mean face, {'hair shell' if hair else 'bald'}: crossing pairs around the seam {crossings}")
    assert set(crossings) == set(OFFLINE_EXPRESSIONS)
    assert not any(crossings.values()), crossings
