"""Identity similarity of renders (paper section 4, figures 4 left and 6 right).

Each render and each reference photo goes through the identity backend the run used (``identity.backend``):
detect, take the largest confident face, align, embed, L2-normalise. The references are averaged into one
unit vector (the mean of the unit embeddings, normalised again). Per render we report:

- ``cosine``: cosine similarity to that reference mean: the paper's metric. With dlib (the offline backend)
  every descriptor shares a large common offset, so the cosine is high even between strangers (~0.9);
  compare runs with it, not with a fixed bar;
- ``distance``: the backend's own identity distance, Euclidean between unit vectors (``sqrt(2 - 2 cosine)``:
  the same ordering) against its calibrated same-person threshold (dlib 0.40, ArcFace 1.15).

A render where no face is found (extreme side views may fail) has neither; it is counted, not an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from idto3d.core.config import IdentityConfig
from idto3d.core.errors import IdtoError
from idto3d.identity.face_backend import FaceBackend
from idto3d.identity.embedder import l2_normalise, make_backend
from idto3d.identity.faces import sort_by_size
from idto3d.identity.photos import collect_photos, load_photo


@dataclass
class FaceEmbedder:
    """The identity backend as ``image -> unit embedding | None``."""

    backend: FaceBackend

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def threshold(self) -> float:
        return float(self.backend.same_person_threshold)

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        faces = self.backend.detect(image)
        if not faces:
            return None
        face = sort_by_size(faces, self.backend.confident_score)[0]
        return l2_normalise(self.backend.embed(self.backend.align(image, face)))


def make_embedder(cfg: IdentityConfig) -> FaceEmbedder:
    return FaceEmbedder(make_backend(cfg))


@dataclass
class References:
    """Reference photos: their unit embeddings ``[R, D]`` and the unit mean ``[D]``."""

    paths: list[Path]
    embeddings: np.ndarray
    mean: np.ndarray


def embed_references(photos: Sequence[str | Path], embedder: FaceEmbedder) -> References:
    """Embed every reference photo (files and/or folders). A photo without a face is an ``IdtoError`` naming it."""
    paths = collect_photos(photos)
    embs = []
    for path in paths:
        e = embedder(load_photo(path))
        if e is None:
            raise IdtoError(f"reference photo {path}: no face found; use photos where the face is roughly frontal "
                            "and at least ~40 px wide")
        embs.append(e)
    emb = np.stack(embs)
    return References(paths, emb, l2_normalise(emb.mean(0)))


def embed_images(images: np.ndarray | Sequence[np.ndarray], embedder: FaceEmbedder,
                 on_image=None) -> list[np.ndarray | None]:  # noqa: ANN001 - optional progress callback
    """Unit embedding per image, None where no face is found."""
    out = []
    for image in images:
        out.append(embedder(np.ascontiguousarray(image)))
        if on_image is not None:
            on_image()
    return out


def cosine_and_distance(embeddings: Sequence[np.ndarray | None], target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity and identity distance of each unit embedding to the unit ``target`` (NaN for None)."""
    cos = np.array([np.nan if e is None else float(np.dot(e, target)) for e in embeddings], dtype=np.float64)
    # Unit vectors: |a - b| = sqrt(2 - 2 cos); clipped so rounding cannot take a square root of -1e-16.
    return cos, np.sqrt(np.clip(2.0 - 2.0 * cos, 0.0, None))


def summary(values: np.ndarray | Sequence[float]) -> dict:
    """``{"mean", "std", "min", "max", "n"}`` over the finite values (statistics null when there are none)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": round(float(v.mean()), 6), "std": round(float(v.std()), 6), "min": round(float(v.min()), 6),
            "max": round(float(v.max()), 6), "n": int(v.size)}
