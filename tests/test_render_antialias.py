"""Claims about silhouette antialiasing: coverage, gradients to the outline, and what it leaves alone."""

import math

import pytest
import torch
import trimesh

from idto3d.render import Mesh, antialias, orbit_camera, rasterize, render_normal_map
from idto3d.render.antialias_torch import edge_topology


def _quad(angle_deg: float, offset: float, half: float = 0.45) -> torch.Tensor:
    a = math.radians(angle_deg)
    square = torch.tensor([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=torch.float64) * half
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
    xy = square @ rot.T + offset
    return torch.cat([xy, torch.zeros(4, 1, dtype=torch.float64), torch.ones(4, 1, dtype=torch.float64)], -1)


QUAD_FACES = torch.tensor([[0, 1, 2], [0, 2, 3]])


@pytest.mark.parametrize("angle,offset", [(0.0, 0.0), (0.0, 0.013), (20.0, 0.0), (33.0, 0.031)])
def test_antialiased_coverage_sums_to_the_analytic_area(angle, offset):
    H = W = 64
    clip = _quad(angle, offset)
    frags = rasterize(clip, QUAD_FACES, (H, W))
    coverage = frags.mask.double().unsqueeze(-1)
    smooth = antialias(coverage, frags, clip, QUAD_FACES)
    area = 0.9**2 * (W / 2) * (H / 2)  # the quad's area in pixels
    assert abs(float(smooth.sum()) - area) < 2.0
    assert smooth.min() >= 0 and smooth.max() <= 1
    if angle == 0.0 and offset == 0.0:  # edges exactly between pixel rows: hard coverage is far off
        assert abs(float(coverage.sum()) - area) > 20


def test_antialias_gradients_match_finite_differences():
    # A near triangle over a far one over background: silhouettes against both.
    clip = torch.tensor(
        [[-0.8, -0.8, 0.5, 1.0], [0.8, -0.7, 0.5, 1.0], [0.1, 0.8, 0.5, 1.0],
         [-0.5, -0.6, -0.2, 1.3], [0.7, 0.05, -0.2, 1.1], [-0.45, 0.75, -0.2, 1.2]],
        dtype=torch.float64,
    )
    clip[:, :3] *= clip[:, 3:]
    clip = clip.unsqueeze(0).requires_grad_(True)
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    color = torch.rand(1, 12, 12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    color.requires_grad_(True)
    reference = rasterize(clip.detach(), faces, 12)

    def outputs(c, col):
        frags = rasterize(c, faces, 12)
        assert torch.equal(frags.triangle_id, reference.triangle_id)  # visibility unchanged
        return antialias(col, frags, c, faces)

    out = outputs(clip, color)
    assert not torch.equal(out, color)  # some pixels were blended
    assert torch.autograd.gradcheck(outputs, (clip, color), eps=1e-6, atol=1e-6)


def test_antialias_leaves_pixels_away_from_silhouettes_unchanged():
    # A flat grid mesh: interior edges join two front-facing triangles and are no silhouette.
    n = 6
    g = torch.linspace(-0.6, 0.6, n, dtype=torch.float64)
    gy, gx = torch.meshgrid(g, g, indexing="ij")
    clip = torch.stack([gx, gy, torch.zeros_like(gx), torch.ones_like(gx)], -1).reshape(-1, 4)
    faces = torch.tensor([[r * n + c, r * n + c + 1, (r + 1) * n + c + 1] for r in range(n - 1) for c in range(n - 1)]
                         + [[r * n + c, (r + 1) * n + c + 1, (r + 1) * n + c] for r in range(n - 1) for c in range(n - 1)])
    frags = rasterize(clip, faces, 48)
    color = frags.triangle_id.unsqueeze(-1).double()  # differs across every interior edge
    out = antialias(color, frags, clip, faces)
    inner = torch.zeros_like(frags.mask)
    inner[:, 10:38, 10:38] = True  # well inside the grid's outline (pixels 7..40)
    assert frags.mask[inner].all()
    assert torch.equal(out[inner], color[inner])
    assert not torch.equal(out, color)  # but the outline is antialiased


def test_edge_topology_finds_neighbours_and_boundaries():
    faces = torch.tensor([[0, 1, 2], [2, 1, 3], [1, 0, 4]])
    topo = edge_topology(faces)
    # Edge k of a face is opposite its vertex k.
    assert topo.neighbor[0].tolist() == [1, -1, 2]
    assert topo.neighbor[1].tolist() == [-1, -1, 0]
    assert not topo.flipped.any()
    flipped = edge_topology(torch.tensor([[0, 1, 2], [1, 2, 3]]))  # second face wound the other way
    assert flipped.flipped[0, 0] and flipped.flipped[1, 2]


def _sphere_mesh(subdivisions: int = 3) -> Mesh:
    ico = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.6)
    return Mesh(torch.tensor(ico.vertices, dtype=torch.float32), torch.tensor(ico.faces, dtype=torch.int64))


def test_mask_loss_gradient_moves_a_sphere_toward_a_shifted_target():
    mesh = _sphere_mesh()
    cam = orbit_camera(0.0, 0.0, 3.0, 40.0)
    shift = torch.tensor([0.15, 0.0, 0.0])
    target = render_normal_map(Mesh(mesh.vertices + shift, mesh.faces), cam, 64).mask.detach()

    verts = mesh.vertices.clone().requires_grad_(True)
    mask = render_normal_map(Mesh(verts, mesh.faces), cam, 64).mask
    ((mask - target) ** 2).sum().backward()
    grad = verts.grad
    assert torch.isfinite(grad).all()
    # Descending the gradient moves the outline toward +x, and only silhouette vertices feel it.
    assert -grad[:, 0].sum() > 0.0
    assert grad[:, 0].sum().abs() > 10 * grad[:, 1].sum().abs()
    facing = verts.detach()[:, 2] > 0.3  # well inside the outline, seen face-on
    assert grad[facing].abs().max() == 0


def test_gradient_descent_on_the_outline_reduces_the_mask_loss():
    mesh = _sphere_mesh()
    cam = orbit_camera([0.0, 20.0], [0.0, 70.0], 3.0, 40.0)
    true_offset = torch.tensor([0.12, -0.08, 0.05])
    target = render_normal_map(Mesh(mesh.vertices + true_offset, mesh.faces), cam, 64).mask.detach()

    offset = torch.zeros(3, requires_grad=True)
    opt = torch.optim.Adam([offset], lr=0.01)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        mask = render_normal_map(Mesh(mesh.vertices + offset, mesh.faces), cam, 64).mask
        loss = ((mask - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    assert (offset.detach() - true_offset).norm() < 0.25 * true_offset.norm()
