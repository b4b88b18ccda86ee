"""UV atlases with xatlas: one chart layout per topology, reused across expressions.

xatlas cuts the surface into charts, flattens each one and packs them into a square; it splits
vertices along chart seams, so the unwrapped mesh has ``V' >= V`` vertices and ``vmapping`` says
which original vertex each one copies. Faces keep their order.

UV convention (same as ``idto3d.render.albedo``): OpenGL, ``u`` right and ``v`` UP, origin at the
bottom-left of the texture image; the glTF writer flips ``v`` for glTF's top-left origin.

Options (fixed so layouts are reproducible): charts with xatlas' defaults (deterministic for a
given input), packing for a ``ATLAS_RESOLUTION``-texel square with ``ATLAS_PADDING`` texels
between charts (so bilinear lookups and mip level 1 do not bleed across charts), ``bilinear`` on,
``blockAlign`` off. Timing on 2 CPU cores: see ``tests/test_export.py`` / the export report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from idto3d.core.errors import IdtoError
from idto3d.render.mesh import Mesh

ATLAS_RESOLUTION = 1024
ATLAS_PADDING = 4
_MIN_AREA = 1e-12  # a face with less (in squared model units) counts as degenerate


class UnwrapError(IdtoError):
    """A mesh cannot be UV-unwrapped (empty, degenerate, or xatlas failed)."""


@dataclass(frozen=True)
class UVMesh:
    """A mesh split along UV seams.

    ``vertices`` float32 ``[V', 3]`` (model units), ``faces`` int64 ``[F, 3]`` into them,
    ``uvs`` float32 ``[V', 2]`` in ``[0, 1]`` (origin bottom-left), ``vmapping`` int64 ``[V']``:
    the source mesh vertex each one copies (``vertices == source_vertices[vmapping]``).
    """

    vertices: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray
    vmapping: np.ndarray

    def with_positions(self, source_vertices: np.ndarray | torch.Tensor) -> "UVMesh":
        """The same layout over another pose of the same topology (e.g. a different expression)."""
        v = _as_vertices(source_vertices)
        if int(self.vmapping.max()) >= v.shape[0]:
            raise UnwrapError(
                f"the mesh has {v.shape[0]} vertices but this UV layout needs at least "
                f"{int(self.vmapping.max()) + 1}; reuse a layout only for meshes with the same topology"
            )
        return UVMesh(v[self.vmapping], self.faces, self.uvs, self.vmapping)

    def render_inputs(self, device: torch.device | str = "cpu") -> tuple[Mesh, torch.Tensor, torch.Tensor]:
        """``(mesh, uv, attribute_faces)`` for ``render_albedo`` / ``render_pbr``: the welded mesh (positions
        shared across seams, so shading normals stay smooth there) with UVs indexed per seam-split vertex."""
        n_source = int(self.vmapping.max()) + 1
        positions = np.zeros((n_source, 3), dtype=np.float32)
        positions[self.vmapping] = self.vertices
        faces = torch.from_numpy(self.vmapping[self.faces]).to(device)
        mesh = Mesh(torch.from_numpy(positions).to(device), faces)
        return mesh, torch.from_numpy(self.uvs).to(device), torch.from_numpy(self.faces).to(device)


def _as_vertices(vertices: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(vertices, torch.Tensor):
        vertices = vertices.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(vertices, dtype=np.float32))


def _mesh_arrays(mesh: Mesh) -> tuple[np.ndarray, np.ndarray]:
    """Validated numpy copies of a mesh: float32 vertices, uint32 faces."""
    v = _as_vertices(mesh.vertices)
    f = mesh.faces.detach().cpu().numpy() if isinstance(mesh.faces, torch.Tensor) else np.asarray(mesh.faces)
    if v.ndim != 2 or v.shape[1] != 3 or v.shape[0] == 0:
        raise UnwrapError(f"cannot unwrap: the mesh has no vertices (vertices shape {tuple(v.shape)}, want [V, 3])")
    if f.ndim != 2 or f.shape[1] != 3 or f.shape[0] == 0:
        raise UnwrapError(f"cannot unwrap: the mesh has no triangles (faces shape {tuple(f.shape)}, want [F, 3])")
    if not np.isfinite(v).all():
        raise UnwrapError("cannot unwrap: the mesh has NaN or infinite vertex positions")
    if f.min() < 0 or f.max() >= v.shape[0]:
        raise UnwrapError(
            f"cannot unwrap: face indices must lie in [0, {v.shape[0] - 1}], got [{int(f.min())}, {int(f.max())}]"
        )
    a, b, c = (v[f[:, i]].astype(np.float64) for i in range(3))
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    n_bad = int((area <= _MIN_AREA).sum())
    if n_bad:
        # xatlas silently drops zero-area faces, which would leave holes in the exported mesh.
        raise UnwrapError(
            f"cannot unwrap: {n_bad} of {f.shape[0]} triangles have zero area; clean the mesh "
            "(merge duplicate vertices, drop collapsed faces) before exporting"
        )
    return v, np.ascontiguousarray(f.astype(np.uint32))


def unwrap(mesh: Mesh) -> UVMesh:
    """UV-unwrap ``mesh`` with xatlas (options in the module docstring). Raises ``UnwrapError``."""
    import xatlas

    v, f = _mesh_arrays(mesh)
    atlas = xatlas.Atlas()
    try:
        atlas.add_mesh(v, f)
        pack = xatlas.PackOptions()
        pack.resolution = ATLAS_RESOLUTION
        pack.padding = ATLAS_PADDING
        pack.bilinear = True
        pack.blockAlign = False
        atlas.generate(xatlas.ChartOptions(), pack)
        vmapping, indices, uvs = atlas[0]
    except Exception as e:  # xatlas reports failures as RuntimeError/ValueError with terse text
        raise UnwrapError(f"xatlas could not unwrap the mesh ({type(e).__name__}: {e}); check it is a clean triangle mesh") from e
    if atlas.atlas_count != 1:
        raise UnwrapError(
            f"xatlas packed the mesh into {atlas.atlas_count} atlases; one is needed for a single texture "
            f"(the mesh is probably far too fine for a {ATLAS_RESOLUTION}^2 atlas)"
        )
    indices = np.asarray(indices, dtype=np.int64)
    uvs = np.asarray(uvs, dtype=np.float32)
    if indices.shape != f.shape or not np.isfinite(uvs).all() or uvs.min() < 0.0 or uvs.max() > 1.0:
        raise UnwrapError(
            f"xatlas returned an unusable layout ({indices.shape[0]} of {f.shape[0]} faces, UV range "
            f"[{uvs.min():.3g}, {uvs.max():.3g}]); check the mesh is a clean triangle mesh"
        )
    vmapping = np.asarray(vmapping, dtype=np.int64)
    return UVMesh(v[vmapping], indices, uvs, vmapping)


def same_topology(meshes: Sequence[Mesh]) -> bool:
    """True when every mesh has the same vertex count and the identical faces array."""
    first = meshes[0]
    return all(
        m.vertices.shape[0] == first.vertices.shape[0]
        and m.faces.shape == first.faces.shape
        and torch.equal(m.faces.detach().cpu(), first.faces.detach().cpu())
        for m in meshes[1:]
    )


def shared_atlas(meshes: Sequence[Mesh], layout: Callable[[Mesh], UVMesh] | None = None) -> list[UVMesh]:
    """Unwrap a set of expression meshes (with ``layout``; default ``unwrap``): one shared layout when they share
    topology, else one each.

    The shared layout is computed on the first mesh (the neutral expression, by convention) and
    reused, so every expression's texture maps are interchangeable texel for texel.
    """
    if len(meshes) == 0:
        raise UnwrapError("no meshes to unwrap; pass at least one expression mesh")
    layout = layout or unwrap
    for m in meshes:
        _mesh_arrays(m)  # the same checks per expression, whichever layout: a collapsed face is still an error
    if not same_topology(meshes):
        return [layout(m) for m in meshes]
    base = layout(meshes[0])
    out = [base]
    for m in meshes[1:]:
        out.append(base.with_positions(m.vertices))
    return out


def chart_labels(atlas: UVMesh) -> np.ndarray:
    """The UV chart of each face of ``atlas``: faces joined through shared (seam-split) vertices."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    f = atlas.faces
    n = atlas.uvs.shape[0]
    graph = coo_matrix((np.ones(2 * f.shape[0]), (np.concatenate([f[:, 0], f[:, 0]]),
                                                   np.concatenate([f[:, 1], f[:, 2]]))), shape=(n, n))
    labels = connected_components(graph, directed=False)[1][f[:, 0]]
    return np.unique(labels, return_inverse=True)[1].reshape(-1)


def chart_count(atlas: UVMesh) -> int:
    """How many UV charts ``atlas`` has."""
    return int(chart_labels(atlas).max()) + 1


def chart_densities(atlas: UVMesh) -> np.ndarray:
    """Each chart's texel density ``sqrt(UV area / 3D area)`` (equal everywhere: no chart wastes the map)."""
    labels = chart_labels(atlas)
    uv = np.bincount(labels, _face_areas(atlas.uvs, atlas.faces))
    xyz = np.bincount(labels, _face_areas(atlas.vertices, atlas.faces))
    return np.sqrt(uv / np.maximum(xyz, 1e-30))


def _face_areas(p: np.ndarray, faces: np.ndarray) -> np.ndarray:
    a, b, c = (p[faces[:, i]].astype(np.float64) for i in range(3))
    return 0.5 * cross_norm(b - a, c - a)


def texel_density_spread(atlas: UVMesh, low: float = 5.0, high: float = 95.0) -> float:
    """The ``high``/``low`` percentile ratio of per-face texel density ``sqrt(UV area / 3D area)`` (1: every
    face gets the same texels per unit of surface)."""
    area3d = _face_areas(atlas.vertices, atlas.faces)
    ok = area3d > _MIN_AREA
    density = np.sqrt(_face_areas(atlas.uvs, atlas.faces)[ok] / area3d[ok])
    lo, hi = np.percentile(density, [low, high])
    return float(hi / max(lo, 1e-30))


def cross_norm(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``|x × y|`` per row, for 2D (UV) or 3D vectors."""
    if x.shape[1] == 2:
        return np.abs(x[:, 0] * y[:, 1] - x[:, 1] * y[:, 0])
    return np.linalg.norm(np.cross(x, y), axis=1)
