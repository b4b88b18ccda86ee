"""Offline expressions that read: each exported expression moves its own region by at least its stated amount,
measured at the face model's landmark vertices of the exported GLBs (smile corners >= 8 mm up/out, mouth_open
lips >= 15 mm apart, every other >= 5 mm)."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from idto3d.evaluate.expression_amplitude import EFFECTS, expression_effect
from idto3d.face_model.offline_expressions import OFFLINE_EXPRESSIONS


def _glb_vertices(path) -> np.ndarray:
    scene = trimesh.load(path, process=False)
    (mesh,) = scene.geometry.values()
    return np.asarray(mesh.vertices)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every offline expression of the mean face, stitched into the head and exported as GLB (grey maps)."""
    from idto3d.export import export_expression
    from idto3d.face_model.morphable_model import load_morphable_model
    from idto3d.geometry.face_merge import placement
    from idto3d.geometry.template import build_head_template
    from idto3d.stages.export_stage import grey_maps
    from idto3d.stages.offline_head import stitched_heads

    model = load_morphable_model()
    heads, atlases, landmarks, _ = stitched_heads(model, None, placement(model.mean, model.landmarks),
                                               build_head_template(64), list(OFFLINE_EXPRESSIONS))
    out = tmp_path_factory.mktemp("expressions")
    paths = {name: export_expression(out, name, atlas, grey_maps())["glb"] for name, atlas in zip(heads, atlases)}
    return paths, landmarks


def test_every_offline_expression_has_a_stated_effect():
    assert set(OFFLINE_EXPRESSIONS) - {"neutral"} <= set(EFFECTS)
    assert all(e.minimum_mm >= 5.0 for e in EFFECTS.values())
    assert EFFECTS["smile"].minimum_mm >= 8.0 and EFFECTS["mouth_open"].minimum_mm >= 15.0


def test_each_exported_expression_moves_its_region_enough(exported):
    paths, landmarks = exported
    assert (landmarks[17:68] >= 0).all()  # the inner landmarks are in the export
    neutral = _glb_vertices(paths["neutral"])
    sizes = {}
    for name in OFFLINE_EXPRESSIONS[1:]:
        effect, mm = expression_effect(name, neutral, _glb_vertices(paths[name]), landmarks)
        sizes[name] = mm
        print(f"{name}: {effect.what} {mm:.1f} mm (needs {effect.minimum_mm:.0f})")
    assert all(sizes[n] >= EFFECTS[n].minimum_mm for n in sizes), sizes
    # An expression measured on its own neighbour's region does not pass by accident.
    _, still = expression_effect("mouth_open", neutral, _glb_vertices(paths["brow_raiser"]), landmarks)
    assert still < 5.0


def test_exported_expression_glbs_pass_the_checks(exported):
    from gltf_checks import check_exported_glb

    paths, _ = exported
    for name in ("smile", "eyes_closed"):
        check_exported_glb(paths[name])
