"""A hair shell: the scalp of the offline head raised into a volume of hair, keeping the head's topology.

The head is a bald template; where the photo shows hair (``texture.hair``), its silhouette should show hair too.
Each vertex above the hairline is moved out along its (smoothed) normal by a thickness that grows smoothly with its
height above the hairline: from 0 ``FADE`` below it (no step where the hair meets the skin) through a few
millimetres at the line to ``MAX_THICKNESS`` ``RAMP`` above it (the crown and the back of the head). The face's
inner part (the face model's vertices the stitch keeps as they are) never moves; across the face's outer band
the thickness ramps harmonically from the body's to 0. The scalp is smooth and convex at the scale of a
centimetre, and the stitch's seam folds nowhere (``geometry.head_stitch``), so the offset surface does not
cross itself (``tests/test_hair_shell.py``, ``tests/test_stitch_seam.py``). The same offsets (found on the
neutral) are added to every expression, which keep one topology and identical scalps.

Coordinates are the working space (+Y up, the face looks down +Z, 1 unit = 0.2 m).
"""

from __future__ import annotations

import numpy as np

MAX_THICKNESS = 0.06  # working units (12 mm): hair over the crown and the back of the head
RAMP = 0.2            # 4 cm above the hairline the hair has its full thickness
FADE = 0.075          # 1.5 cm below the hairline the shell has faded to the skin
SMOOTHING = 30        # neighbour-averaging passes over the normals the shell is raised along


def shell_thickness(height: np.ndarray) -> np.ndarray:
    """``[N]`` working units: the hair's thickness at ``height`` above the hairline (negative: below it)."""
    t = np.clip((np.asarray(height, dtype=np.float64) + FADE) / (RAMP + FADE), 0.0, 1.0)
    return MAX_THICKNESS * t * t * (3.0 - 2.0 * t)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """``[V, 3]`` unit, area-weighted vertex normals (outward for a counter-clockwise closed mesh)."""
    import igl

    return np.asarray(igl.per_vertex_normals(np.asarray(vertices, dtype=np.float64),
                                             np.asarray(faces, dtype=np.int64),
                                             igl.PER_VERTEX_NORMALS_WEIGHTING_TYPE_AREA))


def _neighbour_mean(faces: np.ndarray, n: int):
    """The sparse ``[n, n]`` operator averaging each vertex with its edge neighbours."""
    import scipy.sparse as sp

    f = np.asarray(faces, dtype=np.int64)
    e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    adj = sp.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n)).tocsr()
    adj = ((adj + adj.T + sp.identity(n)) > 0).astype(np.float64)
    return (sp.diags(1.0 / np.asarray(adj.sum(1)).ravel()) @ adj).tocsr()


def smooth_normals(vertices: np.ndarray, faces: np.ndarray, iterations: int = SMOOTHING) -> np.ndarray:
    """``[V, 3]`` vertex normals averaged over their neighbours ``iterations`` times (unit): a direction field
    that turns slowly, so the slivers where the face is stitched to the body move with their surroundings
    instead of along their own folded normals."""
    mean = _neighbour_mean(faces, len(vertices))
    normals = vertex_normals(vertices, faces)
    for _ in range(iterations):
        normals = mean @ normals
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)


def shell_offsets(vertices: np.ndarray, faces: np.ndarray, height: np.ndarray, body: np.ndarray) -> np.ndarray:
    """``[V, 3]`` the hair shell's offsets of a closed head (``vertices``, ``faces``): each vertex out along its
    smoothed normal (:func:`smooth_normals`) by :func:`shell_thickness` of its ``height`` above the hairline, times ``body`` (``[V]`` in [0, 1]:
    1 on the head's body, 0 on the face's inner part)."""
    body = np.clip(np.asarray(body, dtype=np.float64), 0.0, 1.0)
    amount = shell_thickness(height) * body
    # Across the face's outer band (0 < body < 1) the thickness is the harmonic interpolation between the body's
    # and the face's inner part's (0): a steady ramp over the band, not the blend's steeper smoothstep, whose
    # ledge folded the stitch's slivers.
    band = (body > 0.0) & (body < 1.0)
    if band.any():
        import igl

        fixed = np.nonzero(~band)[0]
        amount = np.asarray(igl.harmonic(np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64),
                                         fixed.astype(np.int64), amount[fixed][:, None], 1))[:, 0]
    return smooth_normals(vertices, faces) * amount[:, None]
