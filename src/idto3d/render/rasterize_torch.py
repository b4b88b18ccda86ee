"""A differentiable triangle rasteriser in pure PyTorch, with nvdiffrast's contract.

Visibility is discrete and computed without autograd: every triangle's screen bounding box is
enumerated as (triangle, pixel) candidates, an edge-function test keeps the pixel centres
inside, and ``scatter_reduce(amin)`` on a packed ``(depth << 32) | face`` key is the z-buffer.
Triangles are grouped by bounding-box size so that small ones (nearly all, for dense meshes)
are tested as one broadcast ``[T, h, w]`` grid per group with no per-candidate gathers; large
ones are enumerated explicitly. Either way at most ``max_candidates`` pairs exist at once. Only then, for the H*W winning (pixel, triangle) pairs, barycentrics are recomputed
from the clip-space vertices with autograd, so the differentiable part costs O(pixels), not
O(candidates). Gradients at silhouettes (where visibility changes) come from ``antialias``.

Near plane: a triangle with any vertex in front of the near plane (z < -w) or at/behind the
eye (w <= eps) is dropped whole, not clipped. Cameras are sampled far enough from the head
that this never cuts it; a mesh crossing the near plane shows a hole instead of garbage.
"""

from __future__ import annotations

import torch

from idto3d.render.fragments import Fragments, batched_clip, checked_faces, parse_resolution

_W_EPS = 1e-8
_KEY_EMPTY = torch.iinfo(torch.int64).max
_DEPTH_LEVELS = 2**31 - 1  # depth is quantised to 31 bits so that it packs above a 32-bit face id


class TorchPixels:
    """Compact per-covered-pixel data of the torch backend (see ``Fragments.pixels``)."""

    __slots__ = ("index", "batch", "face", "bary")

    def __init__(self, index: torch.Tensor, batch: torch.Tensor, face: torch.Tensor, bary: torch.Tensor):
        self.index = index  # [N] flat index into B*H*W
        self.batch = batch  # [N]
        self.face = face  # [N]
        self.bary = bary  # [N, 3], differentiable


# Bounding-box sizes (pixels, per axis) that get their own broadcast grid; larger ones go
# through the general enumeration.
_BUCKET_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def _screen_setup(clip: torch.Tensor, faces: torch.Tensor, H: int, W: int, cull_backfaces: bool):
    """Per (batch, face) screen-space data of the triangles that can cover a pixel centre."""
    x, y, z, w = clip.unbind(-1)  # [B, V]
    ok = (w > _W_EPS) & (z >= -w)
    beyond_far = z > w
    w_safe = torch.where(w > _W_EPS, w, torch.ones_like(w))
    inv_w = 1.0 / w_safe
    # Project per vertex (V work), then gather per face corner (3F work).
    sx = ((x * inv_w + 1) * (0.5 * W))[:, faces]  # [B, F, 3] pixel units, x to the right
    sy = ((1 - y * inv_w) * (0.5 * H))[:, faces]  # rows downward (row 0 = top)
    zn = (z * inv_w)[:, faces]
    valid = ok[:, faces].all(-1) & ~beyond_far[:, faces].all(-1)

    xmin = torch.ceil(sx.amin(-1) - 0.5).clamp_(min=0)
    xmax = torch.floor(sx.amax(-1) - 0.5).clamp_(max=W - 1)
    ymin = torch.ceil(sy.amin(-1) - 0.5).clamp_(min=0)
    ymax = torch.floor(sy.amax(-1) - 0.5).clamp_(max=H - 1)
    valid &= (xmin <= xmax) & (ymin <= ymax)
    b_idx, f_idx = valid.nonzero(as_tuple=True)
    sel = (b_idx, f_idx)
    xmin, ymin = xmin[sel], ymin[sel]
    width = (xmax[sel] - xmin + 1).long()
    height = (ymax[sel] - ymin + 1).long()

    # Work relative to the centre of the bbox's first pixel: keeps float32 edge functions
    # accurate for small triangles far from the image origin.
    x0, x1, x2 = (sx[sel] - (xmin + 0.5)[:, None]).unbind(-1)
    y0, y1, y2 = (sy[sel] - (ymin + 0.5)[:, None]).unbind(-1)
    area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
    keep = area.abs() > 1e-12
    if cull_backfaces:
        # Front faces are counter-clockwise in NDC (y up), i.e. clockwise in pixel rows (y down).
        keep &= area < 0
    if not bool(keep.all()):
        k = keep.nonzero().squeeze(1)
        b_idx, f_idx, xmin, ymin, width, height = (t[k] for t in (b_idx, f_idx, xmin, ymin, width, height))
        x0, x1, x2, y0, y1, y2, area = (t[k] for t in (x0, x1, x2, y0, y1, y2, area))
        sel = (b_idx, f_idx)
    inv_area = 1.0 / area
    # Barycentric l_i(px, py) = a_i * px + b_i * py + c_i in the local frame (edge functions / area).
    a0, b0, c0 = (y1 - y2) * inv_area, (x2 - x1) * inv_area, (x1 * y2 - x2 * y1) * inv_area
    a1, b1, c1 = (y2 - y0) * inv_area, (x0 - x2) * inv_area, (x2 * y0 - x0 * y2) * inv_area
    a2, b2, c2 = (y0 - y1) * inv_area, (x1 - x0) * inv_area, (x0 * y1 - x1 * y0) * inv_area
    z0, z1, z2 = zn[sel].unbind(-1)
    # z/w is affine in screen space, so depth is a plane too.
    az, bz, cz = a0 * z0 + a1 * z1 + a2 * z2, b0 * z0 + b1 * z1 + b2 * z2, c0 * z0 + c1 * z1 + c2 * z2
    coef = torch.stack([a0, b0, c0, a1, b1, c1, a2, b2, c2, az, bz, cz], 0)  # [12, T]: rows contiguous

    pixel_base = b_idx * (H * W) + ymin.long() * W + xmin.long()
    return f_idx, coef, width, height, pixel_base


def _planes(coef: torch.Tensor, fx: torch.Tensor, fy: torch.Tensor):
    """Evaluate the three barycentric planes and the depth plane at local pixel offsets."""
    return [coef[3 * i] * fx + (coef[3 * i + 1] * fy + coef[3 * i + 2]) for i in range(4)]


def _inside(l0, l1, l2, depth, tol: float) -> torch.Tensor:
    return (l0 >= -tol) & (l1 >= -tol) & (l2 >= -tol) & (depth >= -1) & (depth <= 1)


def _grid_candidates(coef, width, height, sx: int, sy: int, tol: float):
    """Triangles whose bbox fits in ``sy x sx``: test a broadcast [T, sy, sx] grid, no gathers."""
    c = coef[:, :, None, None]  # [12, T, 1, 1]
    fx = torch.arange(sx, dtype=coef.dtype, device=coef.device).view(1, 1, sx)
    fy = torch.arange(sy, dtype=coef.dtype, device=coef.device).view(1, sy, 1)
    l0, l1, l2, depth = _planes(c, fx, fy)
    inside = _inside(l0, l1, l2, depth, tol)
    if sx > 1 or sy > 1:
        inside &= (fx < width.view(-1, 1, 1)) & (fy < height.view(-1, 1, 1))
    t, py, px = inside.nonzero(as_tuple=True)
    return t, py, px, depth[inside]


def _enumerated_candidates(coef, width, height, tol: float):
    """Any bbox size: enumerate (triangle, pixel) pairs explicitly (used for large triangles)."""
    counts = width * height
    n = int(counts.sum())
    tri = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts, output_size=n)
    local = torch.arange(n, device=counts.device) - (counts.cumsum(0) - counts)[tri]
    w_t = width[tri]
    py = torch.div(local, w_t, rounding_mode="floor")
    px = local - py * w_t
    l0, l1, l2, depth = _planes(coef[:, tri], px.to(coef.dtype), py.to(coef.dtype))
    inside = _inside(l0, l1, l2, depth, tol)
    return tri[inside], py[inside], px[inside], depth[inside]


def _zbuffer(clip: torch.Tensor, faces: torch.Tensor, H: int, W: int, cull_backfaces: bool,
             max_candidates: int) -> torch.Tensor:
    """Packed ``(depth << 32) | face`` of the nearest triangle per pixel, ``_KEY_EMPTY`` if none."""
    B = clip.shape[0]
    keys = torch.full((B * H * W,), _KEY_EMPTY, dtype=torch.int64, device=clip.device)
    face, coef, width, height, pixel_base = _screen_setup(clip, faces, H, W, cull_backfaces)
    if face.numel() == 0:
        return keys
    tol = 32 * torch.finfo(clip.dtype).eps  # accept centres on shared edges: no cracks

    # Group triangles by bbox size so that each group is one dense broadcast grid.
    sizes = torch.tensor(_BUCKET_SIZES, device=width.device)
    nb = len(_BUCKET_SIZES)
    bx = torch.searchsorted(sizes, width).clamp_(max=nb)  # nb = too large for a grid
    by = torch.searchsorted(sizes, height).clamp_(max=nb)
    bucket = torch.where((bx == nb) | (by == nb), nb * nb, bx * nb + by)
    bucket, order = torch.sort(bucket, stable=True)
    face, coef, width, height, pixel_base = face[order], coef[:, order], width[order], height[order], pixel_base[order]
    ids, counts = torch.unique_consecutive(bucket, return_counts=True)

    lo = 0
    for bid, cnt in zip(ids.tolist(), counts.tolist()):
        hi = lo + cnt
        if bid == nb * nb:
            ends = (width[lo:hi] * height[lo:hi]).cumsum(0)
            limits = torch.arange(1, -(-int(ends[-1]) // max_candidates), device=ends.device) * max_candidates
            cuts = [0, *torch.searchsorted(ends, limits, right=True).tolist(), cnt]
            pieces = [(lo + a, lo + b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
        else:
            sx, sy = _BUCKET_SIZES[bid // nb], _BUCKET_SIZES[bid % nb]
            step = max(1, max_candidates // (sx * sy))
            pieces = [(a, min(a + step, hi)) for a in range(lo, hi, step)]
        for a, b in pieces:
            if bid == nb * nb:
                t, py, px, depth = _enumerated_candidates(coef[:, a:b], width[a:b], height[a:b], tol)
            else:
                t, py, px, depth = _grid_candidates(coef[:, a:b], width[a:b], height[a:b], sx, sy, tol)
            t = t + a
            pix = pixel_base[t] + py * W + px
            q = ((depth + 1) * (0.5 * _DEPTH_LEVELS)).long().clamp_(0, _DEPTH_LEVELS)
            keys.scatter_reduce_(0, pix, (q << 32) | face[t], reduce="amin")
        lo = hi
    return keys


def _perspective_bary(clip_flat: torch.Tensor, vids: torch.Tensor, ndc_x: torch.Tensor,
                      ndc_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Perspective-correct barycentrics and NDC depth at NDC points, with autograd.

    With columns c_i = (x_i, y_i, w_i) of the clip-space vertices and p = (ndc_x, ndc_y, 1),
    the 3D barycentrics are proportional to det(p, c_j, c_k) (Olano & Greer's 2D homogeneous
    rasterisation): no division by w per vertex, and exact for any triangle with w > 0.
    """
    v = clip_flat[vids]  # [N, 3, 4]
    cx, cy, cz, cw = v.unbind(-1)  # [N, 3]
    px, py = ndc_x[:, None], ndc_y[:, None]
    # det(p, c_j, c_k) = p . (c_j x c_k) for (j, k) = (1, 2), (2, 0), (0, 1).
    j = [1, 2, 0]
    k = [2, 0, 1]
    xj, yj, wj = cx[:, j], cy[:, j], cw[:, j]
    xk, yk, wk = cx[:, k], cy[:, k], cw[:, k]
    d = px * (yj * wk - wj * yk) + py * (wj * xk - xj * wk) + (xj * yk - yj * xk)
    bary = d / d.sum(-1, keepdim=True)
    depth = (bary * cz).sum(-1) / (bary * cw).sum(-1)
    return bary, depth


def rasterize(
    clip_vertices: torch.Tensor,
    faces: torch.Tensor,
    resolution: int | tuple[int, int],
    cull_backfaces: bool = False,
    max_candidates: int = 1 << 22,
) -> Fragments:
    """Rasterise triangles given in OpenGL clip space into ``Fragments`` (row 0 at the top).

    ``clip_vertices`` is ``[V, 4]`` or ``[B, V, 4]``; ``faces`` ``[F, 3]`` is shared by the batch.
    Back faces are kept by default (open meshes show their inside in normal maps).
    ``max_candidates`` bounds the (triangle, pixel) pairs tested at once, i.e. peak memory.
    """
    clip = batched_clip(clip_vertices)
    B, V, _ = clip.shape
    faces = checked_faces(faces, V).to(clip.device)
    H, W = parse_resolution(resolution)

    with torch.no_grad():
        keys = _zbuffer(clip.detach(), faces, H, W, cull_backfaces, max_candidates)
        index = (keys != _KEY_EMPTY).nonzero().squeeze(1)
        face = keys[index] & 0xFFFFFFFF
        batch = torch.div(index, H * W, rounding_mode="floor")
        rem = index - batch * (H * W)
        row = torch.div(rem, W, rounding_mode="floor")
        col = rem - row * W
        ndc_x = (col.to(clip.dtype) + 0.5) * (2.0 / W) - 1.0
        ndc_y = 1.0 - (row.to(clip.dtype) + 0.5) * (2.0 / H)
        vids = faces[face] + (batch * V)[:, None]

    bary, depth = _perspective_bary(clip.reshape(B * V, 4), vids, ndc_x, ndc_y)

    triangle_id = torch.full((B * H * W,), -1, dtype=torch.int64, device=clip.device)
    triangle_id[index] = face
    dense_bary = clip.new_zeros(B * H * W, 3).index_copy(0, index, bary)
    dense_depth = clip.new_full((B * H * W,), float("inf")).index_copy(0, index, depth)
    return Fragments(
        triangle_id=triangle_id.view(B, H, W),
        bary=dense_bary.view(B, H, W, 3),
        depth=dense_depth.view(B, H, W),
        pixels=TorchPixels(index, batch, face, bary),
    )


def interpolate(attributes: torch.Tensor, fragments: Fragments, faces: torch.Tensor) -> torch.Tensor:
    """Interpolate per-vertex ``[V, C]`` (shared) or ``[B, V, C]`` attributes -> ``[B, H, W, C]``.

    Zeros on background; differentiable w.r.t. the attributes and the barycentrics.
    """
    B, (H, W) = fragments.batch_size, fragments.resolution
    if attributes.dim() == 2:
        attributes = attributes.unsqueeze(0)
    if attributes.dim() != 3 or attributes.shape[0] not in (1, B):
        raise ValueError(f"attributes must be [V, C] or [{B}, V, C], got {tuple(attributes.shape)}")
    Ba, V, C = attributes.shape
    faces = faces.long().to(attributes.device)
    px = fragments.pixels
    if isinstance(px, TorchPixels):
        vids = faces[px.face]
        if Ba > 1:
            vids = vids + (px.batch * V)[:, None]
        values = attributes.reshape(Ba * V, C)[vids]  # [N, 3, C]
        out = torch.einsum("nk,nkc->nc", px.bary.to(values.dtype), values)
        dense = attributes.new_zeros(B * H * W, C).index_copy(0, px.index, out)
        return dense.view(B, H, W, C)
    # Fragments from elsewhere: dense path over all pixels.
    tid = fragments.triangle_id.clamp(min=0)
    vids = faces[tid]  # [B, H, W, 3]
    if Ba > 1:
        vids = vids + (torch.arange(B, device=vids.device) * V).view(B, 1, 1, 1)
    values = attributes.reshape(Ba * V, C)[vids]
    out = torch.einsum("bhwk,bhwkc->bhwc", fragments.bary.to(values.dtype), values)
    return out * fragments.mask.unsqueeze(-1)
