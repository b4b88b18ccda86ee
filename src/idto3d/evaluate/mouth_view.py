"""The mouth of an exported expression, measured: how deep its cavity is, and how dark it renders from the front.

Both read the face model's vertices of the export (``RUN/geometry/head_landmarks.json``: the 68 landmarks and
the mouth strip between the inner lips, ``geometry.mouth_cavity``). The depth is along the export's -Z (the
face looks down +Z), behind the lips' surface at the same place across the mouth: the mean z of the upper and
the lower inner lip (iBUG 60-64 and 60, 67-64) interpolated at each strip vertex's x. The darkness is the mean
luma (Rec. 709, sRGB values) of a front render inside the open mouth's inner-lip outline; the neutral is
measured inside the same outline (placed at its own nose bridge), so the two numbers compare one face region.
"""

from __future__ import annotations

import numpy as np
import torch

from idto3d.core.units import METRES_PER_UNIT
from idto3d.evaluate.assets import ExportedHead
from idto3d.evaluate.views import camera_grid, render_grid
from idto3d.export.turntable import camera_radius

UPPER_INNER = (60, 61, 62, 63, 64)
LOWER_INNER = (60, 67, 66, 65, 64)
_BRIDGE = (27, 28, 29, 30)


def _interp(x: np.ndarray, points: np.ndarray, column: int) -> np.ndarray:
    order = np.argsort(points[:, 0], kind="stable")
    return np.interp(x, points[order, 0], points[order, column])


def cavity_depth_mm(vertices_m: np.ndarray, landmark_vertices: np.ndarray, mouth_vertices: np.ndarray
                    ) -> np.ndarray:
    """``[S]`` millimetres each mouth-strip vertex lies behind the inner lips (negative: in front of them)."""
    v = np.asarray(vertices_m, dtype=np.float64)
    lm = v[np.asarray(landmark_vertices)]
    strip = v[np.asarray(mouth_vertices)]
    lips_z = 0.5 * (_interp(strip[:, 0], lm[list(UPPER_INNER)], 2) + _interp(strip[:, 0], lm[list(LOWER_INNER)], 2))
    return (lips_z - strip[:, 2]) * 1000.0


def mouth_outline(expression_m: np.ndarray, on_m: np.ndarray, landmark_vertices: np.ndarray) -> np.ndarray:
    """``[8, 3]`` metres: the inner-lip outline (60, 61, ..., 67) of the mesh ``expression_m``, moved with its nose
    bridge onto the nose bridge of ``on_m`` (the same face region on another expression of one topology)."""
    idx = np.asarray(landmark_vertices)
    lm = np.asarray(expression_m, dtype=np.float64)[idx]
    bridge = np.asarray(on_m, dtype=np.float64)[idx[list(_BRIDGE)]].mean(0)
    return lm[60:68] - lm[list(_BRIDGE)].mean(0) + bridge


def front_mouth_luma(head: ExportedHead, outline_m: np.ndarray, resolution: int = 256) -> tuple[float, np.ndarray]:
    """``(mean luma in [0, 1], the render)``: ``head`` rendered from the front (``evaluate.views``' studio light
    and framing), averaged inside ``outline_m`` (:func:`mouth_outline`, metres as the GLB stores them)."""
    from skimage.draw import polygon2mask

    grid = camera_grid(1, 1)
    image = render_grid(head, grid, resolution, device="cpu")[0]
    camera = grid.cameras(camera_radius(head.mesh.vertices.numpy(), grid.fov))
    clip = camera.project(torch.from_numpy(np.asarray(outline_m, dtype=np.float64) / METRES_PER_UNIT))[0].numpy()
    ndc = clip[:, :2] / clip[:, 3:4]
    rows = (1.0 - ndc[:, 1]) * 0.5 * resolution - 0.5  # row 0 at the top
    cols = (ndc[:, 0] + 1.0) * 0.5 * resolution - 0.5
    mask = polygon2mask((resolution, resolution), np.stack([rows, cols], 1))
    luma = image.astype(np.float64) / 255.0 @ np.array([0.2126, 0.7152, 0.0722])
    return float(luma[mask].mean()) if mask.any() else float("nan"), image
