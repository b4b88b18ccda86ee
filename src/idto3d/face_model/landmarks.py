"""dlib's 68 facial landmarks (iBUG 300-W order) on the face the identity stage chose."""

from __future__ import annotations

import numpy as np

from idto3d.core.errors import IdtoError


def detect_landmarks68(image: np.ndarray, box: np.ndarray | None = None, detect_max_side: int = 1024) -> np.ndarray:
    """``[68, 2]`` float32 landmarks (x right, y down, pixels) of one face in an RGB ``uint8`` photo.

    ``box`` (``x0, y0, x1, y1`` in this photo's pixels, as the identity file stores it) names the face; without
    it dlib's detector runs and the largest confident face is used.
    """
    from idto3d.identity.dlib_backend import DlibBackend, _models
    from idto3d.identity.faces import sort_by_size

    img = np.asarray(image)
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise IdtoError(f"landmarks need an 8-bit RGB or grey image, got dtype {img.dtype} and shape {img.shape}")
    img = np.ascontiguousarray(img)
    dlib, _, _, sp68, _ = _models()
    h, w = img.shape[:2]
    if box is None:
        backend = DlibBackend(detect_max_side)
        faces = sort_by_size(backend.detect(img), backend.confident_score)
        if not faces:
            raise IdtoError("no face found for the landmark fit")
        box = faces[0].box
    b = np.asarray(box, dtype=np.float64).reshape(-1)
    if b.shape != (4,) or not np.isfinite(b).all() or b[2] <= b[0] or b[3] <= b[1]:
        raise IdtoError(f"face box must be finite x0, y0, x1, y1 with x1 > x0 and y1 > y0, got {box!r}")
    # The same rectangle the identity backend built from this box (dlib boxes are inclusive).
    rect = dlib.rectangle(int(round(b[0])), int(round(b[1])), int(round(b[2])) - 1, int(round(b[3])) - 1)
    if rect.right() < 0 or rect.bottom() < 0 or rect.left() >= w or rect.top() >= h:
        raise IdtoError(f"face box {b.tolist()} lies outside the {w}x{h} photo")
    shape = sp68(img, rect)
    pts = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
    if pts.shape != (68, 2):
        raise IdtoError(f"dlib returned {len(pts)} landmarks, expected 68")
    return pts
