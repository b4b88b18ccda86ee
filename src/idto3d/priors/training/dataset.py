"""The fine-tuning data set: rendered scans listed in ``index.jsonl`` (see ``render_dataset``).

One item per image of the chosen domain: the image as ``[3, R, R]`` in [0, 1], its prompt, the
subject's identity embedding (zeros and ``has_id = False`` when the record has none) and the
expression name. Everything that can be wrong with the folder is checked when the data set is
built, so a bad record fails before training starts, naming the line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from idto3d.core.errors import IdtoError
from idto3d.core.expressions import get_expression

DOMAINS = ("normal", "albedo")
_REQUIRED = ("image", "domain", "prompt", "expression")


class PriorDataError(IdtoError):
    """The training folder, its index or a record it lists is unusable."""


@dataclass(frozen=True)
class PriorRecord:
    image: Path  # absolute
    prompt: str
    expression: str  # canonical name
    id_embedding: Path | None  # absolute
    subject: str
    line: int


def read_index(root: str | Path) -> list[dict]:
    """All records of ``root/index.jsonl`` (each with its line number under ``"_line"``)."""
    root = Path(root)
    if not root.is_dir():
        raise PriorDataError(f"training data folder not found: {root}; build it with 'idto3d render-dataset'")
    index = root / "index.jsonl"
    if not index.is_file():
        raise PriorDataError(f"{root} has no index.jsonl; build the folder with 'idto3d render-dataset'")
    records = []
    for n, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PriorDataError(f"{index}, line {n}: not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise PriorDataError(f"{index}, line {n}: expected a JSON object")
        missing = [k for k in _REQUIRED if k not in rec]
        if missing:
            raise PriorDataError(f"{index}, line {n}: record lacks {', '.join(missing)}")
        rec["_line"] = n
        records.append(rec)
    return records


def load_embedding(path: Path) -> torch.Tensor:
    """The ``embedding`` vector of an identity file (contracts.md), float32 ``[D]``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        emb = load_file(path).get("embedding")
    except (SafetensorError, OSError, ValueError) as exc:
        raise PriorDataError(f"cannot read identity file {path}: {exc}") from None
    if emb is None or emb.dim() != 1:
        raise PriorDataError(f"identity file {path} has no 1-D 'embedding' tensor")
    return emb.to(torch.float32)


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """RGB ``[3, R, R]`` in [0, 1]: transparency over white, centre-cropped square, resized (Lanczos)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            img = im
    except (OSError, UnidentifiedImageError) as exc:
        raise PriorDataError(f"cannot read image {path}: {exc}") from None
    if img.mode in ("RGBA", "LA", "P"):
        rgba = img.convert("RGBA")
        img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img.alpha_composite(rgba)
    img = img.convert("RGB")
    w, h = img.size
    if w != h:
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class PriorDataset(Dataset):
    """Images of one ``domain`` from a folder made by ``render-dataset``.

    ``id_dim`` is the prior's identity size: every identity file must match it (``None``: take it
    from the files, or set it later with ``use_id_dim``; needed before reading items). Items are dicts with
    ``image`` ``[3, R, R]``, ``prompt``, ``id_embedding`` ``[id_dim]``, ``has_id`` (bool tensor),
    ``expression`` (name) and ``index``.
    """

    def __init__(self, root: str | Path, domain: str, resolution: int, id_dim: int | None = None,
                 expression_names: Sequence[str] | None = None):
        if domain not in DOMAINS:
            raise PriorDataError(f"unknown domain {domain!r}; choose one of {', '.join(DOMAINS)}")
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
            raise PriorDataError(f"resolution must be an integer >= 8, got {resolution!r}")
        self.root = Path(root)
        self.domain = domain
        self.resolution = resolution
        index = self.root / "index.jsonl"
        raw = read_index(self.root)
        domains = {r["domain"] for r in raw}
        unknown = sorted(str(d) for d in domains - set(DOMAINS))
        if unknown:
            raise PriorDataError(f"{index} has records of unknown domain(s) {', '.join(unknown)}; "
                                 f"allowed: {', '.join(DOMAINS)}")
        allowed = set(expression_names) if expression_names is not None else None
        records, embeddings = [], {}
        for r in (r for r in raw if r["domain"] == domain):
            where = f"{index}, line {r['_line']}"
            image = self.root / str(r["image"])
            if not image.is_file():
                raise PriorDataError(f"{where}: image {image} does not exist; re-run 'idto3d render-dataset' "
                                     "on this folder to render missing images")
            try:
                expression = get_expression(str(r["expression"])).name
            except ValueError as exc:
                raise PriorDataError(f"{where}: {exc}") from None
            if allowed is not None and expression not in allowed:
                raise PriorDataError(f"{where}: expression {expression!r} is not one the prior knows")
            emb_path = None
            if r.get("id_embedding"):
                emb_path = self.root / str(r["id_embedding"])
                if emb_path not in embeddings:
                    if not emb_path.is_file():
                        raise PriorDataError(f"{where}: identity file {emb_path} does not exist")
                    embeddings[emb_path] = load_embedding(emb_path)
            records.append(PriorRecord(image, str(r["prompt"]), expression, emb_path, str(r.get("subject", "")),
                                       r["_line"]))
        if not records:
            raise PriorDataError(f"{index} lists no {domain} images (domains present: "
                                 f"{', '.join(sorted(domains)) or 'none'})")
        self.records = records
        self._embeddings = embeddings
        self.id_dim: int | None = None
        dims = sorted({int(e.numel()) for e in embeddings.values()})
        if id_dim is not None:
            self.use_id_dim(id_dim)
        elif len(dims) > 1:
            raise PriorDataError(f"{self.root} mixes identity embeddings of sizes {dims}; use one backend for all")
        elif dims:
            self.id_dim = dims[0]

    def use_id_dim(self, id_dim: int) -> None:
        """Check every identity file against the prior's ID size (and use it for absent identities)."""
        bad = {p: int(e.numel()) for p, e in self._embeddings.items() if e.numel() != id_dim}
        if bad:
            path, dim = next(iter(bad.items()))
            raise PriorDataError(
                f"identity file {path} holds a {dim}-D embedding but the prior expects {id_dim}-D "
                f"({len(bad)} file(s) differ); use identities from the backend the prior was built for "
                "(dlib: 128, arcface: 512)")
        self.id_dim = int(id_dim)

    @property
    def has_identities(self) -> bool:
        return bool(self._embeddings)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        if r.id_embedding is not None:
            emb, has_id = self._embeddings[r.id_embedding], True
        elif self.id_dim is None:
            raise PriorDataError("the data set's id_dim is unknown (no identity files): call use_id_dim first")
        else:
            emb, has_id = torch.zeros(self.id_dim), False
        return {"image": load_image(r.image, self.resolution), "prompt": r.prompt, "id_embedding": emb,
                "has_id": torch.tensor(has_id), "expression": r.expression, "index": i}
