"""ArcFace alignment: a similarity transform from 5 landmarks onto the 112x112 ArcFace template."""

from __future__ import annotations

import numpy as np
from skimage.transform import SimilarityTransform, warp

from idto3d.core.errors import IdtoError

# Where ArcFace (insightface) puts left eye, right eye, nose tip and mouth corners in a 112x112 crop.
ARCFACE_DST = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)


def estimate_norm(landmarks5: np.ndarray, image_size: int = 112) -> SimilarityTransform:
    """Least-squares similarity (rotation, uniform scale, translation) photo -> template."""
    src = np.asarray(landmarks5, dtype=np.float64).reshape(5, 2)
    if image_size % 112:
        raise ValueError(f"ArcFace crops are multiples of 112 px, got {image_size}")
    dst = ARCFACE_DST * (image_size / 112.0)
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        tform = SimilarityTransform.from_estimate(src, dst)
        ok = bool(tform)
    else:  # pragma: no cover - older scikit-image
        tform = SimilarityTransform()
        ok = tform.estimate(src, dst)
    if not ok or not np.all(np.isfinite(tform.params)):
        raise IdtoError("face landmarks are degenerate (all on one point); cannot align this face")
    return tform


def norm_crop(image: np.ndarray, landmarks5: np.ndarray, image_size: int = 112) -> np.ndarray:
    """Warp ``image`` (HxWx3 uint8) so the landmarks land on the ArcFace template; uint8 crop."""
    tform = estimate_norm(landmarks5, image_size)
    # warp() wants the output->input map, i.e. the inverse of photo->template.
    out = warp(image, tform.inverse, output_shape=(image_size, image_size), order=1, mode="constant",
               cval=0.0, preserve_range=True)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
