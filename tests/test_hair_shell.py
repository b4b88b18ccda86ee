"""The offline head's hair shell (``geometry.hair_shell``, wired by ``stages.offline_head``): above a hairline the
scalp is raised (the crown and the back by ~12 mm), the face's inner part does not move, the head keeps its
topology and stays one closed manifold without self-intersections; no hair, no shell."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idto3d.core.units import METRES_PER_UNIT
from idto3d.geometry.hair_shell import FADE, MAX_THICKNESS, RAMP, shell_thickness

MM = METRES_PER_UNIT * 1000.0


def test_the_shell_fades_in_below_the_hairline_and_is_full_on_the_crown():
    t = shell_thickness(np.array([-2 * FADE, -FADE, 0.0, RAMP, 3 * RAMP])) * MM
    print(f"thickness, mm: 2 fades below {t[0]:.1f}, at the fade {t[1]:.1f}, at the hairline {t[2]:.1f}, "
          f"a ramp above {t[3]:.1f}, higher {t[4]:.1f}")
    assert t[0] == t[1] == 0.0 and 1.0 < t[2] < 4.0 and t[3] == t[4] == MAX_THICKNESS * MM >= 10.0
    assert (np.diff(shell_thickness(np.linspace(-FADE, RAMP, 50))) > 0).all()  # smooth, no step


def _scalp(vertices: np.ndarray, faces: np.ndarray, nose_base: int) -> np.ndarray:
    """A hairline 6 cm above the nose base over the face (about 2 cm above the brows: the face model's forehead
    reaches above it), dropping to the nose base behind."""
    from idto3d.texture.hair import hairline_at

    points = torch.from_numpy(vertices)
    nape = float(points[nose_base, 1])
    return (points[:, 1] - hairline_at(points, nape + 0.3, nape)).numpy()


@pytest.fixture(scope="module")
def heads():
    from idto3d.face_model.morphable_model import load_morphable_model
    from idto3d.geometry.face_merge import placement
    from idto3d.geometry.template import build_head_template
    from idto3d.stages.offline_head import stitched_heads

    model = load_morphable_model()
    args = (model, None, placement(model.mean, model.landmarks), build_head_template(64), ["neutral", "mouth_open"])
    bald, atlases, landmarks, _ = stitched_heads(*args)
    hair, _, _, _ = stitched_heads(*args, scalp=_scalp)
    none, _, _, _ = stitched_heads(*args, scalp=lambda *a: None)
    return bald, hair, none, landmarks, atlases[0]


def test_the_scalp_rises_the_face_stays_and_the_head_stays_closed(heads):
    from mesh_checks import intersecting_faces

    from idto3d.geometry.mesh_clean import mesh_defects

    bald, hair, none, _, _ = heads
    for name in bald:
        b, h = bald[name].vertices.double().numpy(), hair[name].vertices.double().numpy()
        assert np.array_equal(hair[name].faces.numpy(), bald[name].faces.numpy())
        assert torch.equal(none[name].vertices, bald[name].vertices)  # no hair in the photos: no shell
        crown, back = (h[:, 1].max() - b[:, 1].max()) * MM, (b[:, 2].min() - h[:, 2].min()) * MM
        print(f"{name}: crown {crown:.1f} mm higher, back {back:.1f} mm farther out")
        assert crown >= 10.0 and back >= 10.0
        defects = mesh_defects(hair[name])
        assert defects.components == 1 and defects.nonmanifold_edges == 0, (name, defects)
        assert defects.boundary_edges == 0 and defects.degenerate_faces == 0, (name, defects)
    b, h = bald["neutral"].vertices.double().numpy(), hair["neutral"].vertices.double().numpy()
    faces = hair["neutral"].faces.numpy()
    moved = np.linalg.norm(h - b, axis=1) > 1e-6
    region = np.nonzero(moved[faces].any(1))[0]
    crossing, before = intersecting_faces(h, faces, region), intersecting_faces(b, faces, region)
    print(f"{region.size} shell triangles; crossing another: {len(crossing)} (bald: {len(before)})")
    # The stitch's seam folds nowhere (tests/test_stitch_seam.py), and the shell adds no fold of its own.
    assert not crossing and not before


def test_the_face_does_not_move(heads):
    bald, hair, _, landmarks, atlas = heads
    inner = atlas.vmapping[np.asarray(landmarks)[17:68]]  # brows, eyes, nose, mouth: as head vertex indices
    for name in bald:
        assert torch.equal(hair[name].vertices[inner], bald[name].vertices[inner])
    moved = (hair["neutral"].vertices - bald["neutral"].vertices).norm(dim=1) * MM
    print(f"vertices moved more than 1 mm: {(moved > 1).sum()} of {moved.numel()}")
    assert (moved > 1).any()
