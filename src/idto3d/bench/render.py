"""``idto3d bench``: time the hot paths on this machine, with ratios to a baseline from the same run.

Render rows: forward+backward of rasterise + camera-space normal shading (+ antialias)
for each backend present; the ratio is each backend's time over the fastest one's.
Geometry rows: marching tets alone (the baseline) and marching tets + the
expression-conditioned field, forward+backward, at grid 64 and 128.
"""

from __future__ import annotations

import platform

import torch

from idto3d.core.config import EncodingConfig, GeometryConfig, TemplateConfig
from idto3d.geometry.expression_field import build_field
from idto3d.geometry.marching_tets import marching_tets
from idto3d.geometry.template import build_head_template
from idto3d.geometry.template_fit import fit_field_to_mesh
from idto3d.render.backend import available_backends, get_rasterizer
from idto3d.render.camera import orbit_camera
from idto3d.render.mesh import Mesh
from idto3d.render.normals import render_normal_map
from idto3d.bench.timing import time_ms


def _icosphere(subdivisions: int) -> Mesh:
    import trimesh

    s = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.8)
    return Mesh(torch.tensor(s.vertices, dtype=torch.float32), torch.tensor(s.faces, dtype=torch.int64))


def _render_rows(repeats: int, quick: bool) -> list[dict]:
    sizes = [(5, 128)] if quick else [(5, 256), (5, 512), (6, 256), (6, 512)]
    rows = []
    for subdiv, res in sizes:
        base = _icosphere(subdiv)
        case = f"{base.faces.shape[0] / 1000:.0f}k tris @{res}"
        per_backend = []
        for name in available_backends():
            device = torch.device("cuda" if name == "nvdiffrast" else "cpu")
            rast = get_rasterizer(name, device=device)
            verts = base.vertices.to(device).requires_grad_(True)
            mesh = Mesh(verts, base.faces.to(device))
            cam = orbit_camera(10.0, 30.0, 3.0, 40.0).to(device)

            def step() -> None:
                verts.grad = None
                out = render_normal_map(mesh, cam, res, rasterizer=rast)
                out.image.sum().backward()

            per_backend.append({"stage": "render", "case": case, "backend": name,
                                "ms": time_ms(step, repeats, device)})
        fastest = min(r["ms"] for r in per_backend)
        for r in per_backend:
            r.update(baseline="fastest", ratio=r["ms"] / fastest)
        rows += per_backend
    return rows


def _geometry_rows(repeats: int, quick: bool) -> list[dict]:
    grids = [32] if quick else [64, 128]
    template = build_head_template(64)
    # A short real regression gives the field a head-sized surface, so the timed
    # autograd set (vertices of crossing tets) is what a run would see.
    warm_fit = TemplateConfig(iterations=80, points_per_step=4000)
    rows = []
    for res in grids:
        grid_verts = None
        for kind in ("dense", "hash"):
            cfg = GeometryConfig(grid_resolution=res)
            if kind == "hash":
                cfg.encoding = EncodingConfig(kind="hash", n_levels=16, n_features_per_level=2,
                                              max_resolution=2048)
            field = build_field(cfg, n_expressions=2, seed=0)
            fit_field_to_mesh(field, template, warm_fit, seed=0)
            case = f"grid {res} ({field.tets.shape[0] / 1e6:.1f}M tets)"
            if grid_verts is None:
                with torch.no_grad():
                    sdf = field.grid_sdf(0)
                grid_verts = field.grid_vertices.clone().requires_grad_(True)
                sdf_p = sdf.clone().requires_grad_(True)

                def marching() -> None:
                    marching_tets(grid_verts, sdf_p, field.tets).vertices.square().sum().backward()

                base_ms = time_ms(marching, repeats, torch.device("cpu"))
                rows.append({"stage": "geometry", "case": case, "backend": "marching tets", "ms": base_ms,
                             "baseline": "marching", "ratio": 1.0})

            def field_step(f=field) -> None:
                f.zero_grad(set_to_none=True)
                f(1).vertices.square().sum().backward()

            ms = time_ms(field_step, repeats, torch.device("cpu"))
            rows.append({"stage": "geometry", "case": case, "backend": f"field({kind}) + marching", "ms": ms,
                         "baseline": "marching", "ratio": ms / base_ms})
    return rows


def bench_render(repeats: int = 5, quick: bool = False) -> list[dict]:
    torch.manual_seed(0)
    rows = _render_rows(repeats, quick) + _geometry_rows(repeats, quick)
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine()}
    for r in rows:
        r.update(meta)
    return rows
