"""The interface every identity backend implements (detect -> align -> embed); backends import only this."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from idto3d.core.digest import file_sha256
from idto3d.identity.faces import Face


@dataclass
class AlignedFace:
    model_crop: np.ndarray      # exactly what the recogniser sees (dlib: 150x150 chip; arcface: 112x112)
    arcface_crop: np.ndarray    # the ArcFace-template 112x112 crop (same array for the arcface backend)


def recogniser_record(path: Path) -> dict[str, str]:
    """What identity files and priors record of a recogniser: its file name and the SHA-256 of its bytes
    (embeddings of different recognisers of one size, e.g. w600k_r50 and glintr100, are not interchangeable)."""
    return {"model": Path(path).name, "sha256": file_sha256(path)}


class FaceBackend(Protocol):
    name: str
    dim: int
    recogniser: dict[str, str]  # recogniser_record of the recognition model
    same_person_threshold: float
    confident_score: float      # detections scoring below this rank after all others

    def detect(self, image: np.ndarray) -> list[Face]:
        """All faces in an HxWx3 uint8 RGB photo, boxes/landmarks in its pixels."""

    def align(self, image: np.ndarray, face: Face) -> AlignedFace:
        """Crops the recogniser needs, from the full-resolution photo."""

    def embed(self, aligned: AlignedFace) -> np.ndarray:
        """The recogniser's raw float32 [dim] embedding (not normalised)."""
