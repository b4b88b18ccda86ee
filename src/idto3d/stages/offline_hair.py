"""Where the offline head's hair starts, from the photos: the height of each head vertex above the hairline.

The hair or headwear is segmented in each photo (``texture.hair.segment_hair``, GrabCut from the landmarks,
against the photo's cheek tone); the head's vertices that face a photo's fitted camera and project into its hair
are the hair it shows; the hairline is the lowest of them over the forehead (``texture.hair.hairline_height``)
and drops to the nose base's height at the back (``texture.hair.hairline_at``), as the photo texture's hair
colour does. ``stages.offline_head`` raises the scalp above it into a hair shell (``geometry.hair_shell``).
"""

from __future__ import annotations

import numpy as np
import torch

from idto3d.geometry.hair_shell import vertex_normals
from idto3d.stages.subject_init import SubjectFit
from idto3d.texture.hair import (
    cheek_tone,
    forehead_side,
    hairline_at,
    hairline_height,
    segment_hair,
)


def seen_hair(points: np.ndarray, normals: np.ndarray, subject: SubjectFit) -> np.ndarray | None:
    """``[V]`` bool: the head points (working space) that a photo shows as hair; None when no photo has hair."""
    seen = np.zeros(points.shape[0], bool)
    found = False
    for i, image in enumerate(subject.images):
        landmarks = np.asarray(subject.fit.photos[i].landmarks, dtype=np.float64)
        hair = segment_hair(image, landmarks, cheek_tone(image, landmarks))
        if hair is None:
            continue
        found = True
        camera = subject.camera(i)
        clip = camera.project(torch.from_numpy(points))[0].numpy()
        h, w = hair.mask.shape
        col = np.round((clip[:, 0] / clip[:, 3] + 1.0) * 0.5 * w - 0.5).astype(np.int64)
        row = np.round((1.0 - clip[:, 1] / clip[:, 3]) * 0.5 * h - 0.5).astype(np.int64)
        inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
        facing = ((camera.eye[0].numpy() - points) * normals).sum(1) > 0.0
        hit = np.zeros_like(inside)
        hit[inside] = hair.mask[row[inside], col[inside]]
        seen |= hit & facing
    return seen if found else None


def scalp_heights(subject: SubjectFit):
    """The ``scalp`` argument of ``stages.offline_head.stitched_heads`` for this subject's photos."""
    def heights(vertices: np.ndarray, faces: np.ndarray, nose_base: int) -> np.ndarray | None:
        seen = seen_hair(vertices, vertex_normals(vertices, faces), subject)
        if seen is None:
            return None
        points = torch.from_numpy(vertices)
        line = hairline_height(points, torch.from_numpy(seen), forehead_side(points))
        if line is None:
            return None
        return (points[:, 1] - hairline_at(points, line, float(points[nose_base, 1]))).numpy()

    return heights
