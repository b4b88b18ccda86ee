"""One interface over the identity backends, and how identities are compared.

Comparison: Euclidean distance between L2-normalised embeddings (``identity_distance``),
with a per-backend "same person" threshold (``FaceBackend.same_person_threshold``):

- dlib (128-D): dlib's documented rule is Euclidean distance < 0.6 on its raw descriptors,
  whose norms are ~1.3-1.6. All dlib descriptors share a large common offset, so raw cosine
  similarity is high even between strangers; Euclidean distance is what dlib calibrated.
  On unit vectors that rule becomes ~0.6 / 1.5 = 0.4, which we use. Measured on the photos
  bundled with scikit-image and insightface: the same person under flip/crop/rotation/JPEG/
  darkening <= 0.21, different people (8 faces) >= 0.44.
- arcface (512-D): insightface compares by cosine similarity; ~0.3-0.4 separates people for
  the buffalo_l recogniser, i.e. a unit-vector distance of sqrt(2 - 2 cos) ~ 1.1-1.18.
  We use 1.15 (cosine 0.34). Not re-measured here: no ArcFace weights are available offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from idto3d.core.errors import IdtoError

if TYPE_CHECKING:
    from idto3d.core.config import IdentityConfig
    from idto3d.identity.face_backend import FaceBackend


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.any(n == 0) or not np.all(np.isfinite(x)):
        raise IdtoError("the recogniser returned an all-zero or non-finite embedding; the model file "
                        "may be broken")
    return x / n


def identity_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance between L2-normalised embeddings (broadcasts over leading axes)."""
    return np.linalg.norm(l2_normalise(a) - l2_normalise(b), axis=-1)


def backend_threshold(name: str) -> float:
    from idto3d.identity.arcface_backend import ARCFACE_SAME_PERSON
    from idto3d.identity.dlib_backend import DLIB_SAME_PERSON

    return {"dlib": DLIB_SAME_PERSON, "arcface": ARCFACE_SAME_PERSON}[name]


def make_backend(cfg: IdentityConfig) -> FaceBackend:
    """Build the backend named by ``cfg.backend`` (``dlib`` or ``arcface``)."""
    if cfg.backend == "dlib":
        from idto3d.identity.dlib_backend import DlibBackend

        return DlibBackend(detect_max_side=cfg.detect_max_side)
    if cfg.backend == "arcface":
        from idto3d.identity.arcface_backend import ArcFaceBackend

        if not cfg.insightface_pack:
            raise IdtoError("identity.backend=arcface needs an insightface model pack folder: pass --pack DIR "
                            "(e.g. buffalo_l with det_10g.onnx and w600k_r50.onnx) or set "
                            "identity.insightface_pack")
        return ArcFaceBackend(Path(cfg.insightface_pack), det_threshold=cfg.scrfd_threshold)
    raise IdtoError(f"unknown identity backend '{cfg.backend}'; allowed values: dlib, arcface")
