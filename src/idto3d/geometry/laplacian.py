"""Uniform Laplacian smoothing regulariser (nvdiffrec's ``laplace_regularizer_const``).

For each vertex, the umbrella vector ``v - mean(neighbours)`` is zero when the vertex sits at the
centroid of its one-ring; penalising its squared length smooths the surface without needing
cotangent weights (which are unstable on the slivers marching tets produces).
"""

from __future__ import annotations

import torch

from idto3d.render.mesh import Mesh

__all__ = ["mesh_edges", "laplacian_loss"]


def mesh_edges(faces: torch.Tensor, num_vertices: int | None = None) -> torch.Tensor:
    """Unique undirected edges ``[E, 2]`` (int64, ``a < b``, sorted) of triangles ``[F, 3]``; pass
    ``num_vertices`` where it is known (finding the largest index reads the faces back from the device)."""
    faces = faces.to(torch.int64)
    if faces.numel() == 0:
        return torch.zeros((0, 2), dtype=torch.int64, device=faces.device)
    e = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    lo = e.min(dim=1).values
    hi = e.max(dim=1).values
    n = num_vertices if num_vertices is not None else int(faces.max()) + 1
    # 1-D unique on an int64 key: much faster than unique(dim=0) on the pairs.
    key = torch.unique(lo * n + hi)
    return torch.stack([key // n, key % n], dim=1)


def laplacian_loss(mesh: Mesh) -> torch.Tensor:
    """Mean over vertices of ``||v - mean of v's neighbours||^2`` (neighbours via unique edges).

    Differs from nvdiffrec, which averages over coordinates too (a factor 1/3) and counts each
    interior edge once per adjacent face (same average on closed meshes). Vertices used by no face
    are ignored. Returns a zero that still carries a graph on an empty mesh.
    """
    v = mesh.vertices
    edges = mesh_edges(mesh.faces, v.shape[0])
    if edges.shape[0] == 0:
        return v.sum() * 0.0
    a, b = edges[:, 0], edges[:, 1]
    nbr_sum = torch.zeros_like(v).index_add(0, a, v[b]).index_add(0, b, v[a])
    degree = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    ones = torch.ones_like(a, dtype=v.dtype)
    degree = degree.index_add(0, a, ones).index_add(0, b, ones)
    # A weighted mean over the used vertices rather than v[used]: a boolean index has a data-dependent size,
    # which on a GPU makes the host wait.
    used = (degree > 0).to(v.dtype)
    umbrella = v - nbr_sum / degree.clamp_min(1.0)[:, None]
    return (umbrella.square().sum(-1) * used).sum() / used.sum()
