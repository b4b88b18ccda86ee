"""The expression-conditioned DMTet field (paper section 3.3) and its template initialisation."""

import pytest
import torch

from idto3d.core.config import GeometryConfig, TemplateConfig, load_config
from idto3d.geometry.expression_field import build_field
from idto3d.geometry.marching_tets import marching_tets
from idto3d.geometry.template import build_head_template
from idto3d.geometry.template_fit import fit_field_to_mesh


def _small_field(n_expressions=2, res=20, seed=0):
    cfg = GeometryConfig(grid_resolution=res)
    return build_field(cfg, n_expressions=n_expressions, seed=seed)


def _fit_radius(field, expression, radius, steps=150):
    """Regress one expression to a sphere SDF (analytic, so this test needs no mesh SDF)."""
    opt = torch.optim.Adam(field.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(expression)
    for _ in range(steps):
        p = torch.rand(4000, 3, generator=gen) * 2 - 1
        sdf, _ = field.query(p, expression)
        loss = (sdf - (p.norm(dim=-1) - radius)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_field_is_deterministic_under_a_seed():
    a, b = _small_field(seed=3), _small_field(seed=3)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    assert not torch.equal(_small_field(seed=4).codes, a.codes)


def test_gradients_reach_the_sampled_expression_code_only():
    field = _small_field(n_expressions=3)
    _fit_radius(field, 1, 0.5, steps=60)
    mesh = field(1)
    assert mesh.faces.shape[0] > 0
    mesh.vertices.square().sum().backward()
    g = field.codes.grad
    assert g[1].abs().sum() > 0
    assert g[0].abs().sum() == 0 and g[2].abs().sum() == 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in field.encoding.parameters())


def test_different_expression_codes_produce_different_meshes():
    field = _small_field(n_expressions=2)
    opt = torch.optim.Adam(field.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for step in range(300):  # interleaved, as the geometry stage samples expressions
        e, radius = (0, 0.4) if step % 2 == 0 else (1, 0.65)
        p = torch.rand(4000, 3, generator=gen) * 2 - 1
        loss = (field.query(p, e)[0] - (p.norm(dim=-1) - radius)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        r0 = field(0).vertices.norm(dim=-1).mean().item()
        r1 = field(1).vertices.norm(dim=-1).mean().item()
    assert r0 == pytest.approx(0.4, abs=0.05) and r1 == pytest.approx(0.65, abs=0.05)


def test_active_vertex_forward_matches_a_full_grid_pass():
    """forward() runs autograd only on vertices of crossing tets; values and gradients must not change."""
    torch.manual_seed(0)
    field = _small_field(n_expressions=2)
    _fit_radius(field, 0, 0.5, steps=60)
    with torch.no_grad():  # non-zero offsets so the deformation path is exercised too
        field.head.bias[1:] = 0.3
    fast = field(0)
    fast.vertices.square().sum().backward()
    g_fast = field.codes.grad.clone()
    field.zero_grad()
    verts, sdf = field.deformed_grid(0)
    full = marching_tets(verts, sdf, field.tets)
    full.vertices.square().sum().backward()
    assert torch.equal(fast.faces, full.faces)
    assert torch.allclose(fast.vertices, full.vertices, atol=1e-5)
    assert torch.allclose(g_fast, field.codes.grad, rtol=1e-3, atol=1e-6)


def test_bad_expression_index_is_refused():
    with pytest.raises(IndexError):
        _small_field(n_expressions=2)(2)


def test_sdf_regression_to_the_shipped_template_is_within_one_percent_of_the_bbox_diagonal():
    """Section B's initialisation at the preview preset: Chamfer / bbox diagonal < 1% (reported)."""
    cfg = load_config("preview", overrides=["expressions=[neutral, smile]"])
    template = build_head_template(cfg.template.build_resolution)
    field = build_field(cfg.geometry, n_expressions=2, seed=0)
    report = fit_field_to_mesh(field, template, cfg.template, seed=0)
    print(f"\nchamfer/diag per expression: {[f'{r:.4%}' for r in report.chamfer_relative]} "
          f"in {report.seconds:.1f}s")
    assert all(r < 0.01 for r in report.chamfer_relative), report.chamfer_relative
    assert report.losses[-1] < report.losses[0] / 10


def test_a_field_with_no_surface_gives_an_empty_mesh_that_still_backpropagates():
    field = _small_field(n_expressions=1)
    with torch.no_grad():
        field.head.bias[0] = 1.0  # everything outside: no surface
    mesh = field(0)
    assert mesh.faces.shape[0] == 0
    mesh.vertices.sum().backward()  # must not raise


def test_normal_map_loss_backpropagates_through_render_and_marching_tets_to_the_code():
    """The geometry stage's path: field(e) -> mesh -> camera-space normal map -> loss -> k_exp."""
    from idto3d.render import orbit_camera, render_normal_map

    field = _small_field(n_expressions=2)
    _fit_radius(field, 0, 0.5, steps=60)
    image = render_normal_map(field(0), orbit_camera(10.0, 30.0, 3.0, 40.0), 64).image
    (image - 0.5).square().mean().backward()
    assert field.codes.grad[0].abs().sum() > 0
    assert field.codes.grad[1].abs().sum() == 0


def _first_adam_step(field, groups: list[dict]) -> dict[str, float]:
    """Each parameter's largest change in one Adam step on an SDF loss (every parameter in exactly one group)."""
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(field.parameters()))
    before = {n: p.detach().clone() for n, p in field.named_parameters()}
    opt = torch.optim.Adam(groups)
    sdf, _ = field.query(torch.rand(2000, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1, 0)
    sdf.square().mean().backward()
    opt.step()
    return {n: (p.detach() - before[n]).abs().max().item() for n, p in field.named_parameters()}


def test_the_expression_codes_keep_their_rate_when_the_network_is_slowed():
    """``geometry.code_lr_scale``: with the network at 1e-6 (the miniature experiment's slowed transformer), the
    codes still move at 1e-4; at the default the field keeps its two groups, so older checkpoints still load."""
    from idto3d.nn.state import field_parameter_groups

    field = _small_field(n_expressions=2)
    _fit_radius(field, 0, 0.5, steps=3)  # the zero-initialised head first: then gradients reach the codes
    default = field_parameter_groups(field, 1e-4, 10.0)
    assert len(default) == 2 and any(p is field.codes for p in default[0]["params"])
    groups = field_parameter_groups(field, 1e-6, 1000.0, code_lr_scale=100.0)
    moved = _first_adam_step(field, groups)
    # Adam's first step moves each entry by about its group's lr.
    assert 0.5e-4 < moved["codes"] < 1.05e-4, moved["codes"]
    assert 0.5e-3 < max(v for n, v in moved.items() if n.startswith("encoding")) < 1.05e-3
    assert max(v for n, v in moved.items() if n.startswith("blocks")) < 1.5e-6  # float32 weights near 1: ulp 1.2e-7


def test_the_code_path_moves_at_the_codes_rate_and_the_vertices_route_stays_slow():
    """``geometry.code_path``: the layers only the codes pass through (``code_in``, the code norms and MLPs) join
    the codes' group; every layer a vertex's features pass through stays at the network's rate."""
    from idto3d.nn.state import field_parameter_groups

    field = _small_field(n_expressions=2)
    _fit_radius(field, 0, 0.5, steps=3)
    groups = field_parameter_groups(field, 1e-6, 1000.0, code_lr_scale=100.0, code_path=True)
    moved = _first_adam_step(field, groups)
    code_path = [n for n in moved if n == "codes" or n.startswith("code_in")
                 or any(f".{m}." in n for m in ("norm_c", "norm_code_mlp", "code_mlp"))]
    # The last block's code MLP feeds nothing (the codes are not read after it): no gradient, no move.
    live = [n for n in code_path if (g := field.get_parameter(n).grad) is not None and g.abs().max() > 0]
    assert {"codes", "code_in.weight", "blocks.0.norm_c.weight", "blocks.0.code_mlp.0.weight",
            "blocks.1.norm_c.weight"} <= set(live)
    for n in live:
        assert 0.5e-4 < moved[n] < 1.05e-4, (n, moved[n])
    vertex_route = [n for n in moved if n not in code_path and not n.startswith("encoding")]
    assert vertex_route and all(moved[n] < 1.5e-6 for n in vertex_route), vertex_route
