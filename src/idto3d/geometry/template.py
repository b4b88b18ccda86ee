"""The head template the geometry stage starts from.

The paper initialises DMTet by regressing its SDF to a FLAME head (section B, following
Fantasia3D). FLAME is licensed, so we ship a head built in code instead: an analytic SDF made of
smooth unions/subtractions of ellipsoids, capsules and a rounded cylinder (cranium, face and jaw,
chin, nose, brow ridge, cheeks, eyes in shallow sockets, lips, ears, neck). It is designed in
metres, from average adult proportions (chin to crown ~0.23 m, head breadth ~0.15 m), then mapped
into the normalised working space the tet grid covers. Users with a FLAME mean head (or any other
closed mesh) pass it by path to :func:`load_template` instead.

Conventions: +Y up, the face looks down +Z, negative SDF inside; the head plus neck is ~1.6 units
tall and centred at the origin, so it fits in ``[-0.85, 0.85]^3`` with a margin inside the grid's
``[-1, 1]^3``.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from idto3d.core.errors import MeshError
from idto3d.core.units import METRES_PER_UNIT
from idto3d.render.mesh import Mesh

__all__ = [
    "METRES_PER_UNIT",
    "TEMPLATE_HEIGHT",
    "build_head_template",
    "head_template_sdf",
    "load_template",
    "normalise_mesh",
    "template_metadata",
]

# Height (largest extent) every template is normalised to, in working-space units.
TEMPLATE_HEIGHT = 1.6

# Vertical extent of the design in metres (y of the crown and of the neck's flat bottom), and the
# front/back extremes (nose tip, back of the skull), used to centre the head at the origin.
_CROWN_Y = 0.130
_NECK_BOTTOM_Y = -0.190
_NOSE_TIP_Z = 0.118
_BACK_Z = -0.110
_CENTRE = (0.0, 0.5 * (_CROWN_Y + _NECK_BOTTOM_Y), 0.5 * (_NOSE_TIP_Z + _BACK_Z))


# Facial anchors of the built-in head in metres (surface points, from the parts in ``_head_sdf_metres``), named by
# the dlib/iBUG-68 landmarks they stand for: where a fitted face is placed on the template. The subject's right
# eye is at -x (the head faces +Z, so +X is the subject's left).
_FACE_ANCHORS_METRES = {
    "right_eye": (-0.032, 0.011, 0.082),   # mean of landmarks 36-41
    "left_eye": (0.032, 0.011, 0.082),     # mean of landmarks 42-47
    "nasion": (0.0, 0.020, 0.099),         # landmark 27
    "nose_tip": (0.0, -0.029, 0.119),      # landmark 30
    "mouth": (0.0, -0.0625, 0.098),        # mean of landmarks 48-67
    "chin": (0.0, -0.103, 0.084),          # landmark 8
}


def face_anchors() -> dict[str, torch.Tensor]:
    """The built-in head's facial anchors in working-space units (see ``_FACE_ANCHORS_METRES``)."""
    centre = torch.tensor(_CENTRE)
    return {k: (torch.tensor(v) - centre) / METRES_PER_UNIT for k, v in _FACE_ANCHORS_METRES.items()}


def template_metadata() -> dict[str, float | str]:
    """What a consumer (export, reports) needs to know about the built-in template's units."""
    return {
        "metres_per_unit": METRES_PER_UNIT,
        "height_units": TEMPLATE_HEIGHT,
        "height_metres": _CROWN_Y - _NECK_BOTTOM_Y,
        "up": "+Y",
        "forward": "+Z",
    }


# --- SDF building blocks (all in metres, on [N, 3] tensors) ------------------------------------


def _smin(a: torch.Tensor, b: torch.Tensor, k: float) -> torch.Tensor:
    """Polynomial smooth union: ``min`` blended over a width ``k`` (Quilez), no seams or kinks."""
    h = (k - (a - b).abs()).clamp(min=0.0) / k
    return torch.minimum(a, b) - h * h * k * 0.25


def _smax(a: torch.Tensor, b: torch.Tensor, k: float) -> torch.Tensor:
    return -_smin(-a, -b, k)


def _ellipsoid(p: torch.Tensor, centre: tuple[float, float, float], radii: tuple[float, float, float]) -> torch.Tensor:
    """Quilez's bound for an ellipsoid: exact on the surface, close to metric near it.

    An exact ellipsoid distance needs a root solve per point; the bound is good enough for a
    template that is only ever meshed and regressed near its surface.
    """
    r = p.new_tensor(radii)
    q = p - p.new_tensor(centre)
    k0 = (q / r).norm(dim=-1)
    k1 = (q / (r * r)).norm(dim=-1).clamp(min=1e-12)
    return k0 * (k0 - 1.0) / k1


def _round_cone(p: torch.Tensor, a: tuple[float, float, float], b: tuple[float, float, float],
                ra: float, rb: float) -> torch.Tensor:
    """Exact SDF of the convex hull of two spheres (centre ``a`` radius ``ra``, ``b`` radius ``rb``)."""
    a_ = p.new_tensor(a)
    ba = p.new_tensor(b) - a_
    pa = p - a_
    l2 = float(ba.dot(ba))
    rr = ra - rb
    a2 = l2 - rr * rr
    il2 = 1.0 / l2
    y = pa @ ba
    z = y - l2
    x = pa * l2 - y[:, None] * ba
    x2 = (x * x).sum(-1)
    y2 = y * y * l2
    z2 = z * z * l2
    k = math.copysign(1.0, rr) * rr * rr * x2
    d_a = (x2 + y2).sqrt() * il2 - ra
    d_b = (x2 + z2).sqrt() * il2 - rb
    d_mid = ((x2 * a2 * il2).sqrt() + y * rr) * il2 - ra
    return torch.where(
        torch.sign(z) * a2 * z2 > k, d_b,
        torch.where(torch.sign(y) * a2 * y2 < k, d_a, d_mid),
    )


def _capped_cylinder_y(p: torch.Tensor, cx: float, cz: float, radius: float, y0: float, y1: float,
                       rounding: float) -> torch.Tensor:
    """Vertical cylinder from ``y0`` to ``y1`` with its edges rounded by ``rounding`` (exact)."""
    q = p - p.new_tensor((cx, 0.5 * (y0 + y1), cz))
    half_h = 0.5 * (y1 - y0) - rounding
    rad = radius - rounding
    dx = torch.stack([q[:, 0], q[:, 2]], -1).norm(dim=-1) - rad
    dy = q[:, 1].abs() - half_h
    d = torch.stack([dx, dy], -1)
    return d.clamp(min=0.0).norm(dim=-1) + torch.maximum(dx, dy).clamp(max=0.0) - rounding


def _mirror_x(p: torch.Tensor) -> torch.Tensor:
    """Fold onto x >= 0 so paired features (eyes, ears, cheeks) are modelled once and stay symmetric."""
    return torch.stack([p[:, 0].abs(), p[:, 1], p[:, 2]], -1)


def _rotate_x(p: torch.Tensor, centre: tuple[float, float, float], degrees: float) -> torch.Tensor:
    """Rotate points about an x-parallel axis through ``centre`` (tilts features forward/back)."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    q = p - p.new_tensor(centre)
    y = c * q[:, 1] - s * q[:, 2]
    z = s * q[:, 1] + c * q[:, 2]
    return torch.stack([q[:, 0], y, z], -1) + p.new_tensor(centre)


def _capsule(p: torch.Tensor, a: tuple[float, float, float], b: tuple[float, float, float], r: float) -> torch.Tensor:
    """Exact SDF of a segment from ``a`` to ``b`` thickened by ``r``."""
    a_ = p.new_tensor(a)
    ba = p.new_tensor(b) - a_
    pa = p - a_
    h = ((pa @ ba) / float(ba.dot(ba))).clamp(0.0, 1.0)
    return (pa - h[:, None] * ba).norm(dim=-1) - r


def _head_sdf_metres(p: torch.Tensor) -> torch.Tensor:
    """The head in metres: origin near the ear canals, +Y up, face toward +Z."""
    pm = _mirror_x(p)

    # Cranium, slightly longer front-to-back than wide, as real skulls are.
    d = _ellipsoid(p, (0.0, 0.036, -0.012), (0.076, 0.094, 0.098))

    # Face: an ellipsoid whose width tapers toward the mouth. Scaling x by s <= 1 stretches
    # distances by at most 1/s, so multiplying back by s keeps the SDF a bound; s is quadratic in
    # height so the taper starts without a crease.
    cy, ry = -0.018, 0.072
    t = ((p[:, 1] - cy) / ry).clamp(-1.0, 0.0)
    s = 1.0 - 0.30 * t * t
    q = torch.stack([p[:, 0] / s, p[:, 1], p[:, 2]], -1)
    face = _ellipsoid(q, (0.0, cy, 0.024), (0.069, ry, 0.072)) * s
    d = _smin(d, face, 0.03)

    # Jaw: the mandible's lower edge from each angle (gonion, below the ear) to the chin, which
    # gives the jaw line and the flat underside of the chin seen in profile.
    jaw = _capsule(pm, (0.047, -0.062, -0.002), (0.016, -0.091, 0.068), 0.011)
    d = _smin(d, jaw, 0.03)
    d = _smin(d, _ellipsoid(p, (0.0, -0.089, 0.074), (0.022, 0.016, 0.018)), 0.018)

    # Cheekbones.
    d = _smin(d, _ellipsoid(pm, (0.046, -0.004, 0.052), (0.024, 0.018, 0.028)), 0.025)

    # Brow ridge: a flattened bar above the eyes.
    d = _smin(d, _ellipsoid(p, (0.0, 0.030, 0.072), (0.056, 0.012, 0.022)), 0.02)

    # Eye sockets: shallow smooth subtractions below the brow, then the eyeballs in them.
    socket = _ellipsoid(pm, (0.032, 0.012, 0.096), (0.020, 0.013, 0.018))
    d = _smax(d, -socket, 0.014)
    d = _smin(d, _ellipsoid(pm, (0.032, 0.011, 0.070), (0.0125, 0.0125, 0.0125)), 0.006)

    # Muzzle (the rounded area around the mouth) and the lips on it, split by a shallow groove.
    d = _smin(d, _ellipsoid(p, (0.0, -0.052, 0.072), (0.032, 0.030, 0.026)), 0.02)
    d = _smin(d, _ellipsoid(p, (0.0, -0.056, 0.092), (0.023, 0.008, 0.009)), 0.01)
    d = _smin(d, _ellipsoid(p, (0.0, -0.068, 0.089), (0.020, 0.009, 0.009)), 0.01)
    d = _smax(d, -_ellipsoid(p, (0.0, -0.0625, 0.1045), (0.019, 0.002, 0.0065)), 0.004)

    # Nose: a round cone from the bridge to the tip, plus the two alae beside the tip.
    nose = _round_cone(p, (0.0, 0.016, 0.087), (0.0, -0.027, 0.108), 0.0075, 0.011)
    nose = _smin(nose, _ellipsoid(pm, (0.014, -0.032, 0.096), (0.009, 0.008, 0.009)), 0.008)
    d = _smin(d, nose, 0.012)

    # Ears: flattened ellipsoids tilted back, with a hollow (the concha) facing outward.
    pe = _rotate_x(pm, (0.077, 0.002, -0.012), -15.0)
    ear = _ellipsoid(pe, (0.077, 0.002, -0.012), (0.011, 0.031, 0.019))
    ear = _smax(ear, -_ellipsoid(pe, (0.089, -0.002, -0.008), (0.006, 0.014, 0.010)), 0.004)
    d = _smin(d, ear, 0.008)

    # Neck: a rounded-edge cylinder, closed at the bottom so the surface is watertight.
    neck = _capped_cylinder_y(p, 0.0, -0.016, 0.057, _NECK_BOTTOM_Y, -0.02, 0.012)
    d = _smin(d, neck, 0.025)
    return d


def head_template_sdf(points: torch.Tensor) -> torch.Tensor:
    """Signed distance ``[N]`` (negative inside) of the built-in head at working-space ``points [N, 3]``.

    Approximately metric in working-space units (a bound near the surface, exact for most parts);
    left-right symmetric by construction. Computed in float32 or the points' float dtype.
    """
    dtype = points.dtype if points.dtype.is_floating_point else torch.float32
    p = points.reshape(-1, 3).to(dtype)
    metric = p * METRES_PER_UNIT + p.new_tensor(_CENTRE)
    return _head_sdf_metres(metric) / METRES_PER_UNIT


# --- meshing --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _build_arrays(resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    from idto3d.geometry.marching_tets import marching_tets
    from idto3d.geometry.tetgrid import make_tet_grid

    grid = make_tet_grid(resolution, scale=1.0)
    with torch.no_grad():
        sdf = head_template_sdf(grid.vertices)
        mesh = marching_tets(grid.vertices, sdf, grid.tets)
    vertices, faces = _drop_unused_vertices(mesh.vertices, mesh.faces)
    return vertices.contiguous(), faces.contiguous()


def _drop_unused_vertices(vertices: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep only vertices that faces use (marching tets should leave none unused; cheap insurance)."""
    used = torch.zeros(vertices.shape[0], dtype=torch.bool)
    used[faces.reshape(-1)] = True
    remap = torch.cumsum(used.long(), 0) - 1
    return vertices[used], remap[faces]


def build_head_template(resolution: int = 96) -> Mesh:
    """Mesh the built-in head with marching tetrahedra on a ``resolution`` grid over ``[-1, 1]^3``.

    Deterministic and cached per resolution in this process (callers get fresh tensors, so they may
    modify them). Resolution 96 gives ~44k vertices / ~88k faces in ~2 s on 2 CPU cores, most of
    it evaluating the SDF at the ~0.9M grid vertices; the surface is closed and manifold because the
    head stays well inside the grid.
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 16:
        raise MeshError(
            f"template resolution must be an integer >= 16, got {resolution!r}; 96 is a good default"
        )
    vertices, faces = _build_arrays(resolution)
    return Mesh(vertices.clone(), faces.clone())


# --- user templates -------------------------------------------------------------------------------


def normalise_mesh(mesh: Mesh, height: float = TEMPLATE_HEIGHT) -> Mesh:
    """Centre the bounding box at the origin and scale uniformly so the largest extent is ``height``."""
    v = mesh.vertices.detach().to(torch.float32)
    lo, hi = v.min(0).values, v.max(0).values
    extent = float((hi - lo).max())
    if not extent > 0.0 or not math.isfinite(extent):
        raise MeshError("the template mesh has zero size (all vertices coincide); pass a real head mesh")
    v = (v - 0.5 * (lo + hi)) * (height / extent)
    return Mesh(v, mesh.faces.to(torch.int64))


def load_template(spec: str | Path | None) -> Mesh:
    """The template to regress the SDF to: ``None`` or ``"builtin"`` -> the built-in head.

    Anything else is a path to a closed mesh (OBJ, PLY, STL, GLB, OFF, ... via trimesh), e.g. a
    FLAME mean head you exported yourself. It must already be **+Y up and facing +Z** (we do not
    rotate it). It is validated as a closed, consistently oriented manifold (inverted meshes are
    flipped), then its bounding box is centred at the origin and scaled uniformly so its largest
    extent is 1.6 working-space units.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "builtin")):
        return build_head_template()
    from idto3d.geometry.mesh_io import load_mesh, validate_mesh

    path = Path(spec)
    mesh = load_mesh(path)
    mesh = validate_mesh(mesh, require_watertight=True, name=str(path))
    return normalise_mesh(mesh)
