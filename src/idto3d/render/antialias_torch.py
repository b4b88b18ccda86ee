"""Silhouette antialiasing with gradients to vertex positions (nvdiffrast's ``antialias``).

Rasterised visibility is piecewise constant, so without this an image loss cannot move a
mesh's outline. Following Laine et al. 2020 ("Modular primitives for high-performance
differentiable rendering"), for every pair of horizontally or vertically adjacent pixels
showing different triangles we take the triangle of the nearer pixel, find the edge through
which the segment between the two pixel centres leaves it, and if that edge is a silhouette
edge (a boundary edge, or one whose neighbouring triangle folds behind it in screen space),
blend the two pixels' colours by how far the edge crosses into the other pixel. The blend
weight is a function of the edge's projected vertices, hence the position gradients.
Only edges that are closer to perpendicular to the pixel pair are used, so each silhouette is
handled by either the horizontal or the vertical pairs.

One departure from nvdiffrast: if the edge through which the segment leaves the owning
triangle is not a silhouette, we walk on into the neighbouring triangle (up to ``_MAX_HOPS``)
until one is. Near the outline of a finely tessellated surface the triangles carrying the
silhouette are sub-pixel slivers that own no pixel centre; testing only the owner's edges (as
nvdiffrast does) then misses almost every outline pixel of, e.g., an 82k-face sphere at 256 px,
and the outline gets no gradient. Pairs are first restricted to pixels within 2 px of a
silhouette edge, so the cost follows the outline length.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

from idto3d.render.fragments import Fragments, batched_clip, checked_faces

# An edge crossing may be misplaced by this much (pixels) before it counts as missing the pair.
_CROSSING_SLACK = 1.0 / 16.0
# How many shared edges the search for a silhouette may cross from the owning triangle.
_MAX_HOPS = 32

_topology_cache: dict[str, object] = {}


class EdgeTopology(NamedTuple):
    """Per face and edge k (the edge opposite vertex k, from vertex k+1 to k+2)."""

    neighbor: torch.Tensor  # [F, 3] int64: the face across the edge, -1 on a boundary
    flipped: torch.Tensor  # [F, 3] bool: the neighbour's winding disagrees with ours


def edge_topology(faces: torch.Tensor) -> EdgeTopology:
    """Edge adjacency of ``faces``; non-manifold edges (3+ faces) pair faces arbitrarily.

    The result for the last ``faces`` tensor seen is cached (faces of a fixed mesh are reused
    every step; the sort costs ~10 ms at 82k faces on 2 CPU cores).
    """
    ref = _topology_cache.get("faces")
    if ref is not None and ref() is faces and _topology_cache.get("version") == faces._version:
        return _topology_cache["result"]  # type: ignore[return-value]

    f = faces.long()
    F = f.shape[0]
    a, b = f[:, [1, 2, 0]].reshape(-1), f[:, [2, 0, 1]].reshape(-1)
    n = int(f.max()) + 1 if F else 1
    key = torch.minimum(a, b) * n + torch.maximum(a, b)
    order = torch.argsort(key)
    same = key[order[1:]] == key[order[:-1]]
    first, second = order[:-1][same], order[1:][same]
    neighbor = torch.full((3 * F,), -1, dtype=torch.int64, device=f.device)
    neighbor[first] = torch.div(second, 3, rounding_mode="floor")
    neighbor[second] = torch.div(first, 3, rounding_mode="floor")
    # Consistently wound neighbours traverse the shared edge in opposite directions.
    flipped = torch.zeros(3 * F, dtype=torch.bool, device=f.device)
    same_direction = a[first] == a[second]
    flipped[first] = same_direction
    flipped[second] = same_direction
    result = EdgeTopology(neighbor.view(F, 3), flipped.view(F, 3))

    try:
        _topology_cache.update(faces=weakref.ref(faces), version=faces._version, result=result)
    except TypeError:
        pass
    return result


def _screen(clip_rows: torch.Tensor, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip-space rows ``[..., 4]`` -> pixel coordinates (x right, y down; centres at i + 0.5)."""
    w = clip_rows[..., 3]
    w = torch.where(w.abs() > 1e-12, w, torch.full_like(w, 1e-12))
    sx = (clip_rows[..., 0] / w + 1) * (0.5 * W)
    sy = (1 - clip_rows[..., 1] / w) * (0.5 * H)
    return sx, sy


def silhouette_edges(clip: torch.Tensor, faces: torch.Tensor, topology: EdgeTopology, H: int, W: int) -> torch.Tensor:
    """``[B, F, 3]`` bool: edges on a silhouette in each view.

    An edge is a silhouette if it is a boundary or if its two faces have opposite screen
    orientation (one front-, one back-facing), corrected for inconsistently wound neighbours.
    """
    sx, sy = _screen(clip, H, W)  # [B, V]
    x0, x1, x2 = sx[:, faces].unbind(-1)
    y0, y1, y2 = sy[:, faces].unbind(-1)
    ccw = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0) > 0  # [B, F]
    nb = topology.neighbor
    across = ccw[:, nb.clamp(min=0)]  # [B, F, 3]
    return (nb < 0) | ((ccw[..., None] != across) ^ topology.flipped)


def _silhouette_pixels(silhouette: torch.Tensor, clip: torch.Tensor, faces: torch.Tensor,
                       topology: EdgeTopology, H: int, W: int) -> torch.Tensor:
    """``[B, H, W]`` bool: pixels within 2 px of a silhouette edge (a superset of AA owners).

    A pair can only be antialiased if a silhouette edge crosses the segment between its pixel
    centres, so marking a 5x5 window around unit-spaced samples along every silhouette edge
    is enough. Silhouette edges follow the outline, so this costs O(outline), not O(faces).
    """
    B, F, _ = silhouette.shape
    # One half-edge per edge: boundary edges, and the lower-numbered face of shared ones.
    faces_idx = torch.arange(F, device=faces.device).view(1, F, 1)
    b, f, k = (silhouette & ((topology.neighbor < 0) | (faces_idx < topology.neighbor))).nonzero(as_tuple=True)
    marks = torch.zeros(B, H, W, dtype=torch.bool, device=clip.device)
    if b.numel() == 0:
        return marks
    ends = torch.stack([faces[f, (k + 1) % 3], faces[f, (k + 2) % 3]], -1)  # [E, 2]
    rows = clip[b[:, None], ends]  # [E, 2, 4]
    visible = (rows[..., 3] > 1e-8).all(-1)
    sx, sy = _screen(rows, H, W)
    length = torch.maximum((sx[:, 1] - sx[:, 0]).abs(), (sy[:, 1] - sy[:, 0]).abs())
    # Edges that reach absurdly far off-screen: mark their whole view rather than sample them.
    huge = visible & ~(length <= 2 * (H + W))
    if huge.any():
        marks[b[huge].unique()] = True
    keep = visible & ~huge
    b, sx, sy, length = b[keep], sx[keep], sy[keep], length[keep]
    if b.numel() == 0:
        return marks
    n = length.ceil().long() + 1  # samples per edge, at most 1 px apart
    edge = torch.repeat_interleave(torch.arange(n.numel(), device=n.device), n)
    step = torch.arange(edge.numel(), device=n.device) - (n.cumsum(0) - n)[edge]
    t = step.to(sx.dtype) / (n[edge] - 1).clamp(min=1).to(sx.dtype)
    px = torch.floor(sx[edge, 0] + t * (sx[edge, 1] - sx[edge, 0])).long()
    py = torch.floor(sy[edge, 0] + t * (sy[edge, 1] - sy[edge, 0])).long()
    offsets = torch.arange(-2, 3, device=n.device)
    px = (px[:, None, None] + offsets.view(1, 1, 5)).expand(-1, 5, 5)
    py = (py[:, None, None] + offsets.view(1, 5, 1)).expand(-1, 5, 5)
    bb = b[edge][:, None, None].expand(-1, 5, 5)
    inside = (px >= 0) & (px < W) & (py >= 0) & (py < H)
    marks.view(-1)[((bb * H + py) * W + px)[inside]] = True
    return marks


def _candidate_pairs(triangle_id: torch.Tensor, marks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat pixel indices ``p0, p1`` of neighbouring pixels showing different triangles next to a
    silhouette, and whether each pair is vertical (``p1`` below ``p0``) or horizontal (right)."""
    B, H, W = triangle_id.shape
    found = []
    for vertical in (False, True):
        if vertical:
            differ = (triangle_id[:, :-1] != triangle_id[:, 1:]) & (marks[:, :-1] | marks[:, 1:])
        else:
            differ = (triangle_id[:, :, :-1] != triangle_id[:, :, 1:]) & (marks[:, :, :-1] | marks[:, :, 1:])
        b, y, x = differ.nonzero(as_tuple=True)
        p0 = (b * H + y) * W + x
        found.append((p0, p0 + (W if vertical else 1), torch.full_like(p0, vertical, dtype=torch.bool)))
    return tuple(torch.cat(parts) for parts in zip(*found))  # type: ignore[return-value]


def _along_across(sx: torch.Tensor, sy: torch.Tensor, vertical: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates along a pair's axis and across it (vertical pairs swap x and y)."""
    return torch.where(vertical, sy, sx), torch.where(vertical, sx, sy)


def _aa_deltas(color_flat, clip_flat, faces, V, topology, silhouette, marks, triangle_id, depth):
    """Target pixels and colour increments of all antialiased pixel pairs (both directions)."""
    B, H, W = triangle_id.shape
    with torch.no_grad():
        p0, p1, vertical = _candidate_pairs(triangle_id, marks)
        if p0.numel() == 0:
            return None
        tid, dep = triangle_id.reshape(-1), depth.reshape(-1)
        tri0, tri1 = tid[p0], tid[p1]
        # The triangle of the nearer pixel (background is at +inf) owns the pair.
        use1 = (tri0 < 0) | ((tri1 >= 0) & (dep[p1] < dep[p0]))
        tri = torch.where(use1, tri1, tri0)
        own = torch.where(use1, p1, p0)
        other = torch.where(use1, p0, p1)
        sgn = torch.where(use1, -1.0, 1.0).to(clip_flat.dtype)  # direction own -> other along the axis
        b = torch.div(own, H * W, rounding_mode="floor")
        ox = torch.remainder(own, W).to(clip_flat.dtype) + 0.5
        oy = torch.remainder(torch.div(own, W, rounding_mode="floor"), H).to(clip_flat.dtype) + 0.5
        o_along, o_across = _along_across(ox, oy, vertical)
        vsx, vsy = _screen(clip_flat, H, W)  # every vertex once, [B*V]

        # Follow the segment from the owning pixel centre toward the other one: leave the
        # triangle through its exit edge; a silhouette edge ends the walk, a shared edge hands
        # over to the neighbour (sub-pixel rim triangles own no pixel centre themselves).
        found_tri = torch.full_like(tri, -1)
        found_k = torch.zeros_like(tri)
        active = torch.arange(tri.numel(), device=tri.device)
        cur = tri
        ia, ib = [1, 2, 0], [2, 0, 1]  # edge k runs from vertex k+1 to k+2
        for _ in range(_MAX_HOPS + 1):
            vids = faces[cur] + (b[active] * V)[:, None]
            vert = vertical[active, None]
            u, w = _along_across(vsx[vids], vsy[vids], vert)
            u = u - o_along[active, None]  # relative to the owning pixel centre
            w = w - o_across[active, None]
            au, aw, bu, bw = u[:, ia], w[:, ia], u[:, ib], w[:, ib]
            eu, ew = bu - au, bw - aw
            crosses = (aw <= 0) != (bw <= 0)
            # Where each edge meets the pair's axis, measured from the owner toward the other pixel.
            dc = sgn[active, None] * (au - aw * eu / torch.where(crosses, ew, torch.ones_like(ew)))
            dc = torch.where(crosses, dc, torch.full_like(dc, -float("inf")))
            dck, k = dc.max(-1)
            sil = silhouette[b[active], cur, k]
            within = (dck > -_CROSSING_SLACK) & (dck < 1 + _CROSSING_SLACK)
            # Only edges closer to perpendicular to the pair count (the other direction gets the rest).
            rows = torch.arange(k.numel(), device=k.device)
            hit = sil & within & (ew[rows, k].abs() >= eu[rows, k].abs())
            found_tri[active[hit]] = cur[hit]
            found_k[active[hit]] = k[hit]
            nxt = topology.neighbor[cur, k]
            go_on = ~sil & within & (nxt >= 0)
            active, cur = active[go_on], nxt[go_on]
            if active.numel() == 0:
                break

        sel = (found_tri >= 0).nonzero().squeeze(1)
        if sel.numel() == 0:
            return None
        own, other, sgn, vertical = own[sel], other[sel], sgn[sel], vertical[sel]
        o_along, o_across = o_along[sel], o_across[sel]
        ftri, fk, vbase = found_tri[sel], found_k[sel], b[sel] * V
        ends = torch.stack([faces[ftri, (fk + 1) % 3] + vbase, faces[ftri, (fk + 2) % 3] + vbase], -1)

    # Recompute the crossing of the selected edges with autograd.
    sx, sy = _screen(clip_flat[ends], H, W)  # [M, 2]
    u, w = _along_across(sx, sy, vertical[:, None])
    u, w = u - o_along[:, None], w - o_across[:, None]
    crossing = u[:, 0] - w[:, 0] * (u[:, 1] - u[:, 0]) / (w[:, 1] - w[:, 0])
    t = (sgn * crossing).clamp(0.0, 1.0)
    # t < 1/2: the edge is inside the owning pixel, which is partly uncovered -> it takes some
    # of the other colour; t > 1/2: the triangle reaches into the other pixel.
    into_other = t > 0.5
    target = torch.where(into_other, other, own)
    source = torch.where(into_other, own, other)
    alpha = (t - 0.5).abs()
    delta = alpha[:, None] * (color_flat[source] - color_flat[target])
    return target, delta


def antialias(
    color: torch.Tensor,
    fragments: Fragments,
    clip_vertices: torch.Tensor,
    faces: torch.Tensor,
    topology: EdgeTopology | None = None,
) -> torch.Tensor:
    """Antialias ``color`` ``[B, H, W, C]`` at silhouettes; differentiable w.r.t. colour and positions.

    ``clip_vertices`` and ``faces`` must be those that produced ``fragments``. ``topology`` is
    ``edge_topology(faces)`` if already at hand.
    """
    clip = batched_clip(clip_vertices)
    B, H, W, C = color.shape
    if (B, H, W) != tuple(fragments.triangle_id.shape):
        raise ValueError(f"color {tuple(color.shape)} does not match fragments {tuple(fragments.triangle_id.shape)}")
    Bc, V, _ = clip.shape
    clip = clip.expand(B, V, 4)
    faces = checked_faces(faces, V).to(color.device)
    if faces.shape[0] == 0 or not bool(fragments.mask.any()):
        return color
    if topology is None:
        topology = edge_topology(faces)
    with torch.no_grad():
        silhouette = silhouette_edges(clip.detach(), faces, topology, H, W)
        marks = _silhouette_pixels(silhouette, clip.detach(), faces, topology, H, W)
    result = _aa_deltas(color.reshape(B * H * W, C), clip.reshape(B * V, 4), faces, V, topology,
                        silhouette, marks, fragments.triangle_id, fragments.depth.detach())
    if result is None:
        return color
    target, delta = result
    out = color.reshape(B * H * W, C).index_add(0, target, delta.to(color.dtype))
    return out.view(B, H, W, C)
