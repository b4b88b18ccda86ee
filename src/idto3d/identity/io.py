"""The identity file: safetensors tensors + JSON metadata (format ``idto3d.identity/1``, see notes/contracts)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from idto3d.core.atomic import atomic_write
from idto3d.core.errors import IdtoError

FORMAT = "idto3d.identity/1"
# "synthetic": a synthetic subject's shape code projected to the ID size (stages.synth_identity), no recogniser
BACKENDS = ("dlib", "arcface", "synthetic")


class IdentityFileError(IdtoError):
    """An identity file is missing, unreadable or not in the expected format."""


@dataclass
class IdentityEmbedding:
    embedding: torch.Tensor          # [D] float32, L2-normalised mean of the used photos
    embeddings: torch.Tensor         # [N, D] float32, L2-normalised per photo
    used: torch.Tensor               # [N] bool
    boxes: torch.Tensor              # [N, 4] float32 x0, y0, x1, y1 (photo pixels, after EXIF rotation)
    landmarks: torch.Tensor          # [N, 5, 2] float32 ArcFace order
    backend: str
    photos: list[dict] = field(default_factory=list)
    path: Path | None = None
    # {"model": file name, "sha256": hex} of the recognition model; None in files made before it was recorded
    recogniser: dict | None = None

    @property
    def dim(self) -> int:
        """Embedding size: 128 (dlib) or 512 (ArcFace); the priors' ID projection takes this."""
        return int(self.embedding.shape[0])

    @property
    def n_photos(self) -> int:
        return int(self.embeddings.shape[0])


def _check(ident: IdentityEmbedding) -> None:
    n, d = ident.embeddings.shape
    if ident.backend not in BACKENDS:
        raise IdentityFileError(f"unknown backend {ident.backend!r}; expected one of {BACKENDS}")
    shapes = {"embedding": (ident.embedding.shape, (d,)), "used": (ident.used.shape, (n,)),
              "boxes": (ident.boxes.shape, (n, 4)), "landmarks": (ident.landmarks.shape, (n, 5, 2))}
    for name, (got, want) in shapes.items():
        if tuple(got) != want:
            raise IdentityFileError(f"identity tensor '{name}' has shape {tuple(got)}, expected {want}")
    if len(ident.photos) != n:
        raise IdentityFileError(f"identity metadata lists {len(ident.photos)} photos for {n} embeddings")


def save_identity(path: str | Path, ident: IdentityEmbedding) -> Path:
    """Write atomically: a failure never leaves a partial identity file."""
    from safetensors.torch import save_file

    _check(ident)
    tensors = {
        "embedding": ident.embedding.detach().to(torch.float32).contiguous(),
        "embeddings": ident.embeddings.detach().to(torch.float32).contiguous(),
        "used": ident.used.to(torch.uint8).contiguous(),
        "boxes": ident.boxes.detach().to(torch.float32).contiguous(),
        "landmarks": ident.landmarks.detach().to(torch.float32).contiguous(),
    }
    meta = {"format": FORMAT, "backend": ident.backend, "dim": str(ident.dim), "photos": json.dumps(ident.photos)}
    if ident.recogniser is not None:
        meta["recogniser"] = json.dumps(ident.recogniser)
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def load_identity(path: str | Path) -> IdentityEmbedding:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise IdentityFileError(f"identity file not found: {path} (make one with `idto3d identity PHOTOS -o "
                                f"{path.name}`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise IdentityFileError(f"{path} is not a readable safetensors file: {exc}") from None
    if meta.get("format") != FORMAT:
        raise IdentityFileError(f"{path} is not an idto3d identity file (format {meta.get('format')!r}, "
                                f"expected {FORMAT!r})")
    missing = [k for k in ("embedding", "embeddings", "used", "boxes", "landmarks") if k not in tensors]
    if missing:
        raise IdentityFileError(f"{path} lacks tensor(s) {', '.join(missing)}")
    try:
        photos = json.loads(meta.get("photos", "[]"))
        dim = int(meta.get("dim", "-1"))
        recogniser = json.loads(meta["recogniser"]) if "recogniser" in meta else None
    except ValueError as exc:
        raise IdentityFileError(f"{path}: bad metadata: {exc}") from None
    ident = IdentityEmbedding(embedding=tensors["embedding"], embeddings=tensors["embeddings"],
                              used=tensors["used"].bool(), boxes=tensors["boxes"], landmarks=tensors["landmarks"],
                              backend=meta.get("backend", ""), photos=photos, path=path, recogniser=recogniser)
    _check(ident)
    if dim != ident.dim:
        raise IdentityFileError(f"{path}: metadata says dim={dim} but the embedding has {ident.dim} values")
    if not np.isclose(float(ident.embedding.norm()), 1.0, atol=1e-3):
        raise IdentityFileError(f"{path}: the mean embedding is not L2-normalised")
    return ident
