"""The offline head at full resolution: the face model's mesh stitched into a smooth body (one closed, outward,
manifold surface; every face vertex kept where it is; no step at the seam) and its UV layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idto3d.geometry.face_merge import placement
from idto3d.geometry.head_stitch import build_stitched_head, conform_body, face_mask, pose_head, smooth_body
from idto3d.geometry.template import build_head_template
from idto3d.render.mesh import Mesh
from idto3d.texture.uv_atlas import UVMesh

from mesh_checks import overlapping_texels


@pytest.fixture(scope="module")
def stitched():
    from idto3d.face_model.morphable_model import load_morphable_model

    model = load_morphable_model()
    face = placement(model.mean, model.landmarks)(model.mean)
    mask = face_mask(face, model.faces, model.landmarks)
    body = smooth_body(build_head_template(64), 8000)
    bent = conform_body(body, Mesh(face, model.faces), mask)
    layout = build_stitched_head(bent, Mesh(face, model.faces), mask)
    return model, face, body, bent, layout, pose_head(layout, bent, face)


def _seam_gap(layout, head: Mesh) -> float:
    """The longest edge of the zipper triangles (the seam's width), in working units."""
    start = layout.n_body_faces
    tri = head.faces[start:start + layout.n_bridge_faces]
    v = head.vertices[tri]
    return float(torch.cat([(v[:, i] - v[:, (i + 1) % 3]).norm(dim=1) for i in range(3)]).max())


def test_the_stitched_head_is_one_closed_outward_surface(stitched):
    import trimesh

    model, face, body, bent, layout, head = stitched
    mesh = trimesh.Trimesh(head.vertices.numpy(), head.faces.numpy(), process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume > 0.3  # outward (a head of ~0.6 cubic units)
    assert len(mesh.split(only_watertight=False)) == 1


def test_the_face_keeps_the_face_models_resolution(stitched):
    model, face, body, bent, layout, head = stitched
    kept = layout.face_vertices
    print(f"face vertices kept {kept.size} of {model.mean.shape[0]}, head {head.vertices.shape[0]} vertices, "
          f"{head.faces.shape[0]} faces, body {layout.n_body}")
    assert kept.size > 30_000  # the face at the model's own resolution (the field's remesh had 16k in all)
    inner = layout.blend >= 1.0
    got = head.vertices[layout.n_body:][inner]
    assert torch.allclose(got, face[kept][inner], atol=1e-6)  # inside the band, the face's own vertices
    assert set(model.landmarks[27:68].tolist()) <= set(kept.tolist())  # the inner landmarks are all there


def test_there_is_no_step_at_the_seam(stitched):
    model, face, body, bent, layout, head = stitched
    gap = _seam_gap(layout, head)
    body_edge = float(max((bent.vertices[bent.faces[:, i]] - bent.vertices[bent.faces[:, (i + 1) % 3]]).norm(dim=1)
                          .max() for i in range(3)))
    # Without bending the body onto the face, the face's border lies centimetres off the body.
    loose = pose_head(layout, body, face)
    print(f"seam width {gap * 200:.1f} mm (body edges up to {body_edge * 200:.1f} mm); unbent body "
          f"{_seam_gap(layout, loose) * 200:.1f} mm")
    assert gap <= 1.5 * body_edge
    tilt, loose_tilt = _seam_angles(layout, head), _seam_angles(layout, loose)
    print(f"seam angles: mean {tilt.mean():.1f}, 95th percentile {np.percentile(tilt, 95):.1f} degrees; unbent body "
          f"{loose_tilt.mean():.1f}, {np.percentile(loose_tilt, 95):.1f}; median {np.median(tilt):.1f} against "
          f"{np.median(loose_tilt):.1f}")
    # The zipper lies in the surface (the jagged cut folds some slivers, ~9 % of its edges: not the median).
    assert np.median(tilt) < 3.0
    # The face's cut edge lies on the body (its band is blended onto it).
    from idto3d.geometry.head_stitch import _closest

    border = layout.blend == 0.0
    assert border.sum() > 100
    d, _, _ = _closest(head.vertices[layout.n_body:][border].double().numpy(),
                       bent.vertices.double().numpy(), bent.faces.numpy())
    assert float(d.max()) < 1e-4


# Today's layout (face chart + xatlas on the rest, before issue 19) measured 77 charts and a texel-density spread
# (p95/p5 of sqrt(UV area / 3D area)) of 1.99 on the astronaut run; the hand-cut layout has 5 charts and ~1.6.
MAX_CHARTS = 6
MAX_DENSITY_SPREAD = 2.0


def test_the_atlas_has_a_face_chart_and_four_large_charts_at_one_density(stitched):
    from idto3d.texture.head_atlas import chart_centre, stitched_atlas
    from idto3d.texture.uv_atlas import chart_count, chart_densities, texel_density_spread

    model, face, body, bent, layout, head = stitched
    atlas = stitched_atlas(head, layout, chart_centre(face[model.landmarks[30]]))
    assert np.allclose(atlas.vertices, head.vertices.numpy()[atlas.vmapping])
    assert atlas.faces.shape == head.faces.shape
    assert np.array_equal(atlas.vmapping[atlas.faces], head.faces.numpy())  # faces keep their order
    assert atlas.uvs.min() >= 0.0 and atlas.uvs.max() <= 1.0
    split = layout.n_body_faces + layout.n_bridge_faces
    face_only = UVMesh(atlas.vertices, atlas.faces[split:], atlas.uvs, atlas.vmapping)
    charts, spread = chart_count(atlas), texel_density_spread(atlas)
    print(f"charts {charts}, texel-density spread p95/p5 {spread:.2f}")
    assert chart_count(face_only) == 1  # the face is one chart
    assert charts <= MAX_CHARTS and spread <= MAX_DENSITY_SPREAD
    density = chart_densities(atlas)
    assert density.max() / density.min() < 1.01  # every chart at the same texels per unit of surface
    uv = atlas.uvs[atlas.faces]
    cross = (uv[:, 1, 0] - uv[:, 0, 0]) * (uv[:, 2, 1] - uv[:, 0, 1]) - \
        (uv[:, 1, 1] - uv[:, 0, 1]) * (uv[:, 2, 0] - uv[:, 0, 0])
    coverage = float(np.abs(cross).sum() / 2)
    print(f"folded triangles: {(cross <= 0).sum()} of {len(cross)}; the charts cover {coverage:.0%} of the map")
    assert (cross <= 0).mean() < 1e-3  # every chart keeps the winding (no mirrored island, next to no folds)
    # Charts do not overlap: rasterised at 512^2, no texel is covered by two charts.
    assert overlapping_texels(atlas) < 1e-3
    other = atlas.with_positions(head.vertices + 0.01)
    assert np.allclose(other.vertices, atlas.vertices + 0.01, atol=1e-6)


def _seam_angles(layout, head: Mesh) -> np.ndarray:
    """Angles (degrees) between the normals of the triangles on either side of every edge the zipper shares
    with the face or the body: a step at the seam tilts the zipper against its neighbours."""
    n = head.face_normals().numpy()
    f = head.faces.numpy()
    start, stop = layout.n_body_faces, layout.n_body_faces + layout.n_bridge_faces
    owner = {}
    for i, tri in enumerate(f):
        for k in range(3):
            owner.setdefault((int(tri[(k + 1) % 3]), int(tri[k])), i)  # the opposite direction's owner
    angles = []
    for i in range(start, stop):
        for k in range(3):
            j = owner.get((int(f[i, k]), int(f[i, (k + 1) % 3])))
            if j is not None and not start <= j < stop:
                angles.append(np.degrees(np.arccos(np.clip(n[i] @ n[j], -1.0, 1.0))))
    return np.asarray(angles)
