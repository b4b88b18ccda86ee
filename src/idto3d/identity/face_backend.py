"""The interface every identity backend implements (detect -> align -> embed); backends import only this."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from idto3d.identity.faces import Face


@dataclass
class AlignedFace:
    model_crop: np.ndarray      # exactly what the recogniser sees (dlib: 150x150 chip; arcface: 112x112)
    arcface_crop: np.ndarray    # the ArcFace-template 112x112 crop (same array for the arcface backend)


class FaceBackend(Protocol):
    name: str
    dim: int
    same_person_threshold: float
    confident_score: float      # detections scoring below this rank after all others

    def detect(self, image: np.ndarray) -> list[Face]:
        """All faces in an HxWx3 uint8 RGB photo, boxes/landmarks in its pixels."""

    def align(self, image: np.ndarray, face: Face) -> AlignedFace:
        """Crops the recogniser needs, from the full-resolution photo."""

    def embed(self, aligned: AlignedFace) -> np.ndarray:
        """The recogniser's raw float32 [dim] embedding (not normalised)."""
