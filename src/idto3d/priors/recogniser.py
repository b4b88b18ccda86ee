"""Which face recogniser a prior's ID branch expects, and the one-line refusal when an identity was made by another.

Records are ``{"model": file name, "sha256": hex or None}``: identity files store their recogniser's (see
``identity.face_backend.recogniser_record``), priors the one their ID branch was trained on (IP-Adapter FaceID:
insightface buffalo_l's ``w600k_r50.onnx``). Embeddings of ``glintr100`` (antelopev2) or ``w600k_mbf``
(buffalo_s) have the same size but another space, so the size check alone lets them through.
"""

from __future__ import annotations

from pathlib import Path

from idto3d.core.digest import file_sha256
from idto3d.core.errors import IdtoError

PACKS = {"w600k_r50.onnx": "insightface buffalo_l", "glintr100.onnx": "insightface antelopev2",
         "w600k_mbf.onnx": "insightface buffalo_s", "dlib_face_recognition_resnet_model_v1.dat": "dlib"}
FACEID_RECOGNISER = {"model": "w600k_r50.onnx", "sha256": None}


def record_of(path: str | Path) -> dict:
    """The record of a recogniser file (as identity files store it)."""
    path = Path(path)
    if not path.is_file():
        raise IdtoError(f"recogniser file not found: {path}")
    return {"model": path.name, "sha256": file_sha256(path)}


def describe(record: dict) -> str:
    model = str(record.get("model"))
    pack = PACKS.get(model)
    digest = record.get("sha256")
    return f"{model}{f' ({pack})' if pack else ''}{f' sha256 {digest[:12]}' if digest else ''}"


def check_recogniser(expected: dict | None, got: dict | None, prior_ref: str, identity_ref: str) -> None:
    """Refuse an identity whose recogniser is not (or not known to be) the one the prior expects."""
    if not expected:
        return
    need = describe(expected)
    fix = "recompute the identity with that recogniser (`idto3d identity PHOTOS --pack <folder with it> -o ...`)"
    if not got:
        raise IdtoError(f"prior {prior_ref} needs identities made with {need}, but {identity_ref} does not record "
                        f"its recogniser (made before idto3d recorded it): {fix}")
    same_name = got.get("model") == expected.get("model")
    both_hashed = expected.get("sha256") and got.get("sha256")
    if not same_name or (both_hashed and got["sha256"] != expected["sha256"]):
        raise IdtoError(f"prior {prior_ref} needs identities made with {need}, but {identity_ref} was made with "
                        f"{describe(got)}: {fix}")
