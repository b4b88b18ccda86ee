"""Detected faces and the choice of the subject among them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from idto3d.core.errors import IdtoError

# A second face at least this fraction of the largest one's area makes the choice ambiguous.
SIMILAR_SIZE_RATIO = 0.8


@dataclass
class Face:
    """One detected face, in the original photo's pixel coordinates.

    ``landmarks5`` are in ArcFace order: left eye, right eye, nose tip, left and right
    mouth corner, where left/right mean the image's left/right (the subject's right/left).
    """

    box: np.ndarray                 # [4] x0, y0, x1, y1
    score: float
    landmarks5: np.ndarray          # [5, 2]
    extra: Any = field(default=None, repr=False, compare=False)  # backend data (dlib's 5-point shape)

    @property
    def area(self) -> float:
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))

    @property
    def size(self) -> float:
        """The shorter side of the box in pixels."""
        return float(min(self.box[2] - self.box[0], self.box[3] - self.box[1]))


@dataclass
class Choice:
    index: int                      # position in the size-sorted list (0 = largest)
    face: Face
    ambiguous: bool                 # several faces of similar size and no explicit index
    note: str = ""


def sort_by_size(faces: list[Face], confident_score: float = float("-inf")) -> list[Face]:
    """Confident faces largest first, then weak detections largest first; ``--face-index`` counts in this order.

    Weak detections (score below ``confident_score``) go last because a detector's
    false positives on clothes or rotated-photo borders can be larger than the real face.
    """
    return sorted(faces, key=lambda f: (f.score < confident_score, -f.area, f.box[0], f.box[1]))


def count_confident(faces: list[Face], confident_score: float = float("-inf")) -> int:
    return sum(f.score >= confident_score for f in faces)


def choose_face(faces: list[Face], face_index: int | None, photo: str,
                confident_score: float = float("-inf")) -> Choice:
    """Pick the subject: the largest confident face, or ``face_index`` in ``sort_by_size`` order."""
    if not faces:
        raise IdtoError(f"{photo}: no face found; use a photo where the face is roughly frontal "
                        "and at least ~40 px wide")
    faces = sort_by_size(faces, confident_score)
    if face_index is not None:
        if not 0 <= face_index < len(faces):
            raise IdtoError(f"{photo}: --face-index {face_index} is out of range; this photo has "
                            f"{len(faces)} face(s), numbered 0 (largest) to {len(faces) - 1}")
        return Choice(face_index, faces[face_index], False)
    similar = [i for i, f in enumerate(faces[1:], 1)
               if f.area >= SIMILAR_SIZE_RATIO * faces[0].area and f.score >= confident_score]
    if not similar:
        return Choice(0, faces[0], False)
    b = np.round(faces[0].box).astype(int)
    note = (f"{photo}: {len(similar) + 1} faces of similar size; chose face 0 (the largest, box "
            f"x0={b[0]} y0={b[1]} x1={b[2]} y1={b[3]}); pass --face-index N (0 = largest, "
            f"up to {len(faces) - 1}) to use another")
    return Choice(0, faces[0], True, note)
