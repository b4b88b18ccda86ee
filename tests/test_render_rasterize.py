"""Claims about the PyTorch rasteriser: visibility, barycentrics and their gradients."""

import pytest
import torch
import trimesh

from idto3d.core.errors import IdtoError
from idto3d.render import interpolate, orbit_camera, rasterize


def _clip(points, w=None, dtype=torch.float64):
    """NDC-ish (x, y, z) rows -> clip rows with the given w (default 1)."""
    p = torch.tensor(points, dtype=dtype)
    w = torch.ones(len(p), dtype=dtype) if w is None else torch.tensor(w, dtype=dtype)
    return torch.cat([p * w[:, None], w[:, None]], -1)


def _sphere(subdivisions=3, dtype=torch.float32):
    ico = trimesh.creation.icosphere(subdivisions=subdivisions)
    return torch.tensor(ico.vertices, dtype=dtype), torch.tensor(ico.faces, dtype=torch.int64)


def test_background_has_triangle_id_minus_one_zero_barycentrics_and_infinite_depth():
    clip = _clip([[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.0, 0.5, 0.0]])
    frags = rasterize(clip, torch.tensor([[0, 1, 2]]), 32)
    bg = ~frags.mask
    assert bg.any() and frags.mask.any()
    assert (frags.triangle_id[bg] == -1).all()
    assert (frags.bary[bg] == 0).all()
    assert torch.isinf(frags.depth[bg]).all()
    covered = frags.bary[frags.mask]
    assert torch.allclose(covered.sum(-1), torch.ones(len(covered), dtype=covered.dtype))
    assert (covered >= -1e-9).all()


def test_image_row_zero_is_the_top_and_column_zero_the_left():
    # A triangle in the upper-right quadrant of NDC (y up) lands in the top-right of the image.
    clip = _clip([[0.2, 0.2, 0.0], [0.9, 0.2, 0.0], [0.9, 0.9, 0.0]])
    frags = rasterize(clip, torch.tensor([[0, 1, 2]]), (40, 60))
    rows, cols = frags.mask[0].nonzero(as_tuple=True)
    assert frags.mask.shape == (1, 40, 60)
    assert rows.max() < 20 and cols.min() >= 30


@pytest.mark.parametrize("near_first", [True, False])
def test_zbuffer_keeps_the_nearer_of_two_overlapping_triangles(near_first):
    far = [[-0.8, -0.8, 0.5], [0.8, -0.8, 0.5], [0.0, 0.8, 0.5]]
    near = [[-0.6, -0.9, -0.2], [0.9, 0.0, -0.2], [-0.6, 0.9, -0.2]]
    clip = _clip(near + far if near_first else far + near)
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    near_id = 0 if near_first else 1
    frags = rasterize(clip, faces, 48)
    alone = rasterize(clip, faces[near_id : near_id + 1], 48)
    # Wherever the near triangle covers a pixel it wins; elsewhere the far one shows.
    assert (frags.triangle_id[alone.mask] == near_id).all()
    assert (frags.triangle_id[frags.mask & ~alone.mask] == 1 - near_id).all()
    assert torch.allclose(frags.depth[alone.mask], torch.full_like(frags.depth[alone.mask], -0.2))


def test_barycentrics_are_perspective_correct():
    # Interpolating world positions with the barycentrics and projecting them back must
    # land exactly on each pixel centre (screen-space barycentrics would not).
    cam = orbit_camera(20.0, 30.0, 2.0, 60.0, dtype=torch.float64)
    world = torch.tensor([[-0.8, -0.5, 0.6], [0.7, -0.6, -0.9], [0.0, 0.8, 0.2]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2]])
    clip = cam.project(world)
    H, W = 24, 32
    frags = rasterize(clip, faces, (H, W))
    pos = interpolate(world, frags, faces)[frags.mask]
    proj = cam.project(pos)[0]
    ndc = proj[:, :2] / proj[:, 3:]
    rows, cols = frags.mask[0].nonzero(as_tuple=True)
    expected = torch.stack([(cols + 0.5) / W * 2 - 1, 1 - (rows + 0.5) / H * 2], -1).double()
    assert len(pos) > 50
    assert torch.allclose(ndc, expected, atol=1e-10)


def test_barycentric_and_depth_gradients_match_finite_differences():
    # Perspective triangles (different w) so the perspective-correct formula is exercised;
    # gradcheck's 1e-6 perturbations are far too small to move any pixel centre across an edge.
    clip = _clip(
        [[-0.7, -0.6, 0.1], [0.8, -0.4, 0.3], [-0.1, 0.7, -0.2], [0.9, 0.8, 0.4]],
        w=[1.5, 2.5, 2.0, 3.0],
    ).unsqueeze(0).requires_grad_(True)
    faces = torch.tensor([[0, 1, 2], [1, 3, 2]])

    reference = rasterize(clip.detach(), faces, 12)
    assert reference.mask.sum() > 40

    def outputs(c):
        frags = rasterize(c, faces, 12)
        assert torch.equal(frags.triangle_id, reference.triangle_id)  # visibility unchanged
        depth = torch.where(frags.mask, frags.depth, torch.zeros_like(frags.depth))
        return frags.bary, depth

    assert torch.autograd.gradcheck(outputs, (clip,), eps=1e-6, atol=1e-6)


def test_interpolated_attributes_have_gradients_matching_finite_differences():
    clip = _clip([[-0.7, -0.6, 0.1], [0.8, -0.4, 0.3], [-0.1, 0.7, -0.2]], w=[1.5, 2.5, 2.0])
    clip = clip.unsqueeze(0).expand(2, -1, -1).clone().requires_grad_(True)
    faces = torch.tensor([[0, 1, 2]])
    attrs = torch.randn(2, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    reference = rasterize(clip.detach(), faces, 12)

    def outputs(c, a):
        frags = rasterize(c, faces, 12)
        assert torch.equal(frags.triangle_id, reference.triangle_id)  # visibility unchanged
        return interpolate(a, frags, faces)

    assert torch.autograd.gradcheck(outputs, (clip, attrs), eps=1e-6, atol=1e-6)


def test_shared_and_batched_attributes_interpolate_alike_with_zeros_on_background():
    verts, faces = _sphere(2)
    cam = orbit_camera([0.0, 40.0], [0.0, 120.0], 3.0, 45.0)
    frags = rasterize(cam.project(verts), faces, 32)
    shared = interpolate(verts, frags, faces)
    batched = interpolate(verts.expand(2, -1, -1), frags, faces)
    assert shared.shape == (2, 32, 32, 3)
    assert torch.allclose(shared, batched)
    assert (shared[~frags.mask] == 0).all()
    # Points on the sphere's chords have norm close to (and below) 1.
    norms = shared[frags.mask].norm(dim=-1)
    assert norms.max() <= 1 + 1e-5 and norms.min() > 0.9


def test_edges_through_pixel_centres_leave_no_cracks():
    # A grid mesh whose vertices sit exactly on pixel centres: every shared edge passes
    # through pixel centres, the worst case for the inside test.
    H = W = 32
    n = 9
    idx = torch.arange(n, dtype=torch.float32) * 3 + 2  # pixel columns/rows 2, 5, ..., 26
    xs = (idx + 0.5) / W * 2 - 1
    ys = 1 - (idx + 0.5) / H * 2
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    z = 0.1 * torch.sin(3 * gx) * torch.cos(2 * gy)
    clip = torch.stack([gx, gy, z, torch.ones_like(gx)], -1).reshape(-1, 4)
    faces = []
    for r in range(n - 1):
        for c in range(n - 1):
            a, b, d, e = r * n + c, r * n + c + 1, (r + 1) * n + c, (r + 1) * n + c + 1
            faces += [[a, d, b], [b, d, e]] if (r + c) % 2 else [[a, d, e], [a, e, b]]
    frags = rasterize(clip, torch.tensor(faces), (H, W))
    inside = frags.mask[0, 2:27, 2:27]
    assert inside.all()
    assert not frags.mask[0, :2].any() and not frags.mask[0, 27:].any()


def test_closed_sphere_covers_exactly_one_connected_disc_without_holes():
    verts, faces = _sphere(3)
    frags = rasterize(orbit_camera(0.0, 0.0, 3.0, 45.0).project(verts), faces, 64)
    mask = frags.mask[0]
    rows = mask.any(1).nonzero().squeeze(1)
    for r in rows.tolist():  # every row of a convex silhouette is one contiguous run
        cols = mask[r].nonzero().squeeze(1)
        assert cols.max() - cols.min() + 1 == len(cols)


def test_triangles_crossing_the_near_plane_are_dropped_whole():
    faces = torch.tensor([[0, 1, 2]])
    inside = _clip([[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.0, 0.5, 0.0]])
    crossing = inside.clone()
    crossing[2, 2] = -1.5  # z < -w: in front of the near plane
    behind = inside.clone()
    behind[2] = torch.tensor([0.0, 0.5, 0.0, -1.0])  # w < 0: behind the eye
    assert rasterize(inside, faces, 16).mask.any()
    assert not rasterize(crossing, faces, 16).mask.any()
    assert not rasterize(behind, faces, 16).mask.any()


def test_back_faces_are_kept_by_default_and_culled_on_request():
    ccw = _clip([[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.0, 0.5, 0.0]])  # front-facing in NDC
    front, back = torch.tensor([[0, 1, 2]]), torch.tensor([[0, 2, 1]])
    assert rasterize(ccw, back, 16).mask.any()
    assert rasterize(ccw, front, 16, cull_backfaces=True).mask.any()
    assert not rasterize(ccw, back, 16, cull_backfaces=True).mask.any()


def test_small_candidate_chunks_give_identical_results():
    verts, faces = _sphere(3)
    # Add a large quad behind the sphere so the large-triangle path is chunked too.
    quad = torch.tensor([[-1.5, -1.5, -1.0], [1.5, -1.5, -1.0], [1.5, 1.5, -1.0], [-1.5, 1.5, -1.0]])
    verts = torch.cat([verts, quad])
    n = len(verts)
    faces = torch.cat([faces, torch.tensor([[n - 4, n - 3, n - 2], [n - 4, n - 2, n - 1]])])
    clip = orbit_camera([0.0, 30.0], [0.0, 45.0], 3.0, 50.0).project(verts)
    full = rasterize(clip, faces, 96)
    chunked = rasterize(clip, faces, 96, max_candidates=500)
    assert (full.triangle_id >= len(faces) - 2).any()
    assert torch.equal(full.triangle_id, chunked.triangle_id)
    assert torch.equal(full.bary, chunked.bary)


def test_a_batch_renders_like_its_views_one_by_one():
    verts, faces = _sphere(2)
    cam = orbit_camera([0.0, 30.0, -20.0], [0.0, 100.0, 200.0], [3.0, 2.5, 3.5], 45.0)
    together = rasterize(cam.project(verts), faces, 40)
    for i in range(3):
        alone = rasterize(cam[i].project(verts), faces, 40)
        assert torch.equal(together.triangle_id[i], alone.triangle_id[0])
        assert torch.allclose(together.bary[i], alone.bary[0])


@pytest.mark.parametrize("resolution", [0, (16,), (16, -2), 2.5, True])
def test_bad_resolution_raises_idto_error(resolution):
    clip = _clip([[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.0, 0.5, 0.0]])
    with pytest.raises(IdtoError):
        rasterize(clip, torch.tensor([[0, 1, 2]]), resolution)


def test_out_of_range_face_indices_raise_idto_error():
    clip = _clip([[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.0, 0.5, 0.0]])
    with pytest.raises(IdtoError):
        rasterize(clip, torch.tensor([[0, 1, 3]]), 16)
