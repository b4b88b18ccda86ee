"""The offline default: dlib's HOG detector, 5/68-point predictors and ResNet recogniser (128-D).

The weights ship in the ``face-recognition-models`` wheel. That package's ``__init__``
needs ``pkg_resources``, so its folder is located with ``find_spec`` instead of imported.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

from idto3d.core.errors import IdtoError
from idto3d.identity.align import norm_crop
from idto3d.identity.face_backend import AlignedFace, recogniser_record
from idto3d.identity.faces import Face
from idto3d.identity.photos import downscale

DLIB_SAME_PERSON = 0.40  # on unit vectors; see idto3d.identity.embedder
CHIP_SIZE = 150          # dlib's recogniser was trained on 150 px chips with 25% padding
CHIP_PADDING = 0.25
# HOG margins below this are "weak": on the bundled photos real faces scored 0.21-2.8 and false
# positives (clothing, black borders of rotated photos) 0.0-0.20.
DLIB_CONFIDENT_SCORE = 0.3


def models_dir() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise IdtoError("the dlib backend needs the 'face-recognition-models' package "
                        "(pip install face-recognition-models)")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


@lru_cache(maxsize=1)
def _models() -> tuple:
    try:
        import dlib
    except ImportError:
        raise IdtoError("the dlib backend needs dlib (pip install dlib-bin)") from None
    d = models_dir()
    files = {k: d / f for k, f in (("sp5", "shape_predictor_5_face_landmarks.dat"),
                                   ("sp68", "shape_predictor_68_face_landmarks.dat"),
                                   ("rec", "dlib_face_recognition_resnet_model_v1.dat"))}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise IdtoError(f"dlib model file(s) missing: {', '.join(missing)}; reinstall face-recognition-models")
    return (dlib, dlib.get_frontal_face_detector(), dlib.shape_predictor(str(files["sp5"])),
            dlib.shape_predictor(str(files["sp68"])), dlib.face_recognition_model_v1(str(files["rec"])))


@lru_cache(maxsize=1)
def _recogniser() -> dict[str, str]:
    return recogniser_record(models_dir() / "dlib_face_recognition_resnet_model_v1.dat")


def landmarks5_from_68(pts: np.ndarray) -> np.ndarray:
    """ArcFace-order 5 points from dlib's 68 (iBUG 300-W numbering, image-left eye = 36-41)."""
    return np.stack([pts[36:42].mean(0), pts[42:48].mean(0), pts[30], pts[48], pts[54]]).astype(np.float32)


class DlibBackend:
    name = "dlib"
    dim = 128
    same_person_threshold = DLIB_SAME_PERSON
    confident_score = DLIB_CONFIDENT_SCORE

    def __init__(self, detect_max_side: int = 1024) -> None:
        self.detect_max_side = detect_max_side
        self._dlib, self._detector, self._sp5, self._sp68, self._rec = _models()
        self.recogniser = _recogniser()

    def detect(self, image: np.ndarray) -> list[Face]:
        dlib = self._dlib
        small, scale = downscale(image, self.detect_max_side)
        rects, scores, _ = self._detector.run(small, 0, 0.0)
        if not rects:
            # HOG finds faces down to ~80 px; one 2x upsampling reaches ~40 px at 4x the cost.
            rects, scores, _ = self._detector.run(small, 1, 0.0)
        h, w = image.shape[:2]
        faces = []
        for rect, score in zip(rects, scores):
            # dlib boxes are inclusive; map back to the full-resolution photo.
            box = np.array([rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1], dtype=np.float64) / scale
            box = np.clip(box, 0, [w, h, w, h])
            full = dlib.rectangle(int(round(box[0])), int(round(box[1])), int(round(box[2])) - 1,
                                  int(round(box[3])) - 1)
            # Landmarks on the full-resolution photo: sharper than on the detection copy.
            shape5 = self._sp5(image, full)
            shape68 = self._sp68(image, full)
            pts = np.array([(p.x, p.y) for p in shape68.parts()], dtype=np.float32)
            faces.append(Face(box=box.astype(np.float32), score=float(score),
                              landmarks5=landmarks5_from_68(pts), extra=shape5))
        return faces

    def align(self, image: np.ndarray, face: Face) -> AlignedFace:
        chip = self._dlib.get_face_chip(image, face.extra, size=CHIP_SIZE, padding=CHIP_PADDING)
        return AlignedFace(model_crop=np.ascontiguousarray(chip), arcface_crop=norm_crop(image, face.landmarks5))

    def embed(self, aligned: AlignedFace) -> np.ndarray:
        # Given a 150x150 chip, dlib skips its own alignment: the saved chip is exactly what it saw.
        return np.asarray(self._rec.compute_face_descriptor(aligned.model_crop), dtype=np.float32)
