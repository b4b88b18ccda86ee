"""What every mesh we export must be: one body, manifold, closed, no collapsed faces, and accepted by our own
``idto3d render`` (which validates it as a closed manifold); and what its UV layout must be."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from idto3d.cli import app
from idto3d.core.run_layout import RunLayout
from idto3d.geometry.mesh_clean import mesh_defects
from idto3d.geometry.mesh_io import load_mesh
from idto3d.stages.texture_stage import load_atlases
from idto3d.texture.uv_atlas import chart_count, texel_density_spread


def check_exported_meshes(run: Path, tmp: Path) -> list[Path]:
    """Assert every ``export/*.obj|glb`` of ``run`` is clean and ``idto3d render`` accepts it; returns them."""
    files = sorted((run / "export").glob("*.obj")) + sorted((run / "export").glob("*.glb"))
    assert files
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a GLB's texture/material notes are not the point here
            defects = mesh_defects(load_mesh(path))
        print(f"{path.name}: {defects}")
        assert defects.components == 1 and defects.nonmanifold_edges == 0, (path, defects)
        assert defects.boundary_edges == 0 and defects.degenerate_faces == 0, (path, defects)
        out = tmp / f"{path.stem}_{path.suffix[1:]}.png"
        result = CliRunner().invoke(app, ["render", str(path), "-o", str(out), "--views", "1", "--resolution", "32"])
        assert result.exit_code == 0, (path, result.output)
        assert out.stat().st_size > 0
    return files


def atlas_numbers(run: Path, names: list[str]) -> dict[str, tuple[int, float]]:
    """``{expression: (charts, texel-density spread p95/p5)}`` of the run's UV atlas."""
    atlases = load_atlases(RunLayout(run).atlas, names)
    out = {n: (chart_count(a), texel_density_spread(a)) for n, a in atlases.items()}
    print("atlas (charts, density spread):", {n: (c, round(s, 2)) for n, (c, s) in out.items()})
    return out


def same_layout(run: Path, names: list[str]) -> bool:
    """True when every expression's atlas has the first one's faces and UVs (stored once for all)."""
    atlases = load_atlases(RunLayout(run).atlas, names)
    first = atlases[names[0]]
    return all(np.array_equal(a.faces, first.faces) and np.array_equal(a.uvs, first.uvs) for a in atlases.values())


def overlapping_texels(atlas, size: int = 512) -> float:
    """Share of covered texels (triangle centroids snapped to texels, per chart) that two charts cover."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    f = atlas.faces
    n = atlas.uvs.shape[0]
    g = coo_matrix((np.ones(2 * len(f)), (np.r_[f[:, 0], f[:, 0]], np.r_[f[:, 1], f[:, 2]])), shape=(n, n))
    label = connected_components(g, directed=False)[1][f[:, 0]]
    texel = np.floor(atlas.uvs[f].mean(1) * size).astype(np.int64)
    key = np.unique(np.stack([texel[:, 0] * size + texel[:, 1], label], 1), axis=0)
    return float((np.unique(key[:, 0], return_counts=True)[1] > 1).mean())


def intersecting_faces(vertices: np.ndarray, faces: np.ndarray, region: np.ndarray) -> list[tuple[int, int]]:
    """Pairs ``(region face, any face)`` that cross each other (libigl's triangle-triangle test), faces sharing a
    vertex aside: the self-intersections of a mesh around the faces ``region``."""
    import igl
    from scipy.spatial import cKDTree

    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    lo, hi = v[f].min(1), v[f].max(1)
    centre, radius = 0.5 * (lo + hi), 0.5 * np.linalg.norm(hi - lo, axis=1)
    tree = cKDTree(centre)
    pairs = []
    for a in np.asarray(region, dtype=np.int64):
        b = np.asarray(tree.query_ball_point(centre[a], radius[a] + radius.max()), dtype=np.int64)
        b = b[((lo[b] <= hi[a]) & (hi[b] >= lo[a])).all(1)]
        b = b[~np.isin(f[b], f[a]).any(1)]
        for c in b:
            if igl.tri_tri_intersection_test_3d(*(v[f[k]][i][None] for k in (a, c) for i in range(3)))[0]:
                pairs.append((int(a), int(c)))
    return pairs


def seam_region(layout, faces: np.ndarray) -> np.ndarray:
    """The faces of a stitched head (``geometry.head_stitch.StitchedHead`` ``layout``) outside the face's inner
    part: the body, the zipper and the face's outer band blended onto the body: where the seam can fold."""
    inner = np.concatenate([np.zeros(layout.n_body, bool), layout.blend >= 1.0])
    return np.nonzero(~inner[np.asarray(faces)].all(1))[0]


def stitched_with_layout(monkeypatch, *args, **kwargs):
    """``stages.offline_head.stitched_heads(*args, **kwargs)`` and the stitch layout it built (recorded on its
    way through ``build_stitched_head``)."""
    from idto3d.stages import offline_head

    layouts = []
    build = offline_head.build_stitched_head

    def recording(*a, **k):
        layouts.append(build(*a, **k))
        return layouts[-1]

    with monkeypatch.context() as m:
        m.setattr(offline_head, "build_stitched_head", recording)
        out = offline_head.stitched_heads(*args, **kwargs)
    return out, layouts[-1]


def seam_crossings(heads: dict, layout) -> dict[str, int]:
    """``{expression: crossing face pairs around the seam}`` of stitched heads (one topology, ``layout``'s)."""
    out = {}
    for name, mesh in heads.items():
        v, f = mesh.vertices.double().numpy(), mesh.faces.numpy()
        out[name] = len({tuple(sorted(p)) for p in intersecting_faces(v, f, seam_region(layout, f))})
    return out
