"""The expression vocabulary: 23 FACS-coded descriptors in the FaceWarehouse style.

The paper conditions its priors on CLIP embeddings of "the textual descriptor of the 23 FACS coded
expressions proposed in FaceWareHouse". FaceWarehouse itself lists 20 expressions (neutral plus 19);
NPHM, the prior's training data, captures 23 per subject. The three added here (mouth open, surprise,
disgust) complete the set with common FACS combinations. The order is fixed: ``neutral`` is first and an
NPHM-style expression folder index ``i`` maps to ``EXPRESSIONS[i]`` by default; that mapping is our
assumption (the data set's own index order was not available to check) and ``render-dataset`` lets a user
override it.

``expression_embeddings`` gives the descriptors' CLIP embeddings (the pooled output of a base model's own
text encoder), cached on disk per text encoder: ``$IDTO3D_CACHE/expressions`` (default
``~/.cache/idto3d/expressions``), one safetensors file named by a hash of the encoder's config, tokenizer
vocabulary and weights. torch is imported lazily: ``idto3d.config`` imports this module for names only.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idto3d.errors import IdtoError

if TYPE_CHECKING:
    import torch


class ExpressionError(IdtoError, ValueError):
    """An unknown expression name (a ``ValueError`` too, for callers that catch that)."""


@dataclass(frozen=True)
class Expression:
    name: str
    action_units: str  # FACS action units, for the reader; the descriptor is what gets embedded
    descriptor: str


EXPRESSIONS: tuple[Expression, ...] = (
    Expression("neutral", "AU0", "a neutral face with relaxed muscles and a closed mouth"),
    Expression("mouth_stretch", "AU27", "a mouth stretched wide open with the jaw pulled down"),
    Expression("smile", "AU6+AU12", "a smile with raised cheeks and lip corners pulled up"),
    Expression("brow_lower", "AU4", "eyebrows lowered and drawn together in a frown"),
    Expression("brow_raiser", "AU1+AU2", "inner and outer eyebrows raised high"),
    Expression("anger", "AU4+AU5+AU7+AU23", "an angry face with lowered brows, glaring eyes and pressed lips"),
    Expression("jaw_left", "AU30L", "the jaw shifted to the left"),
    Expression("jaw_right", "AU30R", "the jaw shifted to the right"),
    Expression("jaw_forward", "AU29", "the jaw thrust forward"),
    Expression("mouth_left", "AU14L", "the closed mouth pulled to the left"),
    Expression("mouth_right", "AU14R", "the closed mouth pulled to the right"),
    Expression("dimpler", "AU14", "lip corners tightened inward, making dimples"),
    Expression("chin_raiser", "AU17", "the chin boss pushed up, raising the lower lip"),
    Expression("lip_puckerer", "AU18", "lips puckered forward as for a kiss"),
    Expression("lip_funneler", "AU22", "lips funnelled outward in an O shape"),
    Expression("sadness", "AU1+AU4+AU15", "a sad face with inner brows raised and lip corners down"),
    Expression("lip_roll", "AU28", "both lips rolled in and sucked into the mouth"),
    Expression("grin", "AU12+AU25", "a broad grin showing the teeth"),
    Expression("cheek_blowing", "AU33", "cheeks puffed out with air and lips closed"),
    Expression("eyes_closed", "AU43", "both eyes closed with a relaxed face"),
    Expression("mouth_open", "AU25+AU26", "lips parted and the jaw dropped, mouth open"),
    Expression("surprise", "AU1+AU2+AU5+AU26", "a surprised face with raised brows, wide eyes and dropped jaw"),
    Expression("disgust", "AU9+AU10", "a disgusted face with a wrinkled nose and raised upper lip"),
)

EXPRESSION_NAMES: tuple[str, ...] = tuple(e.name for e in EXPRESSIONS)
_BY_NAME = {e.name: e for e in EXPRESSIONS}


def get_expression(name: str) -> Expression:
    """The expression called ``name``; an ``ExpressionError`` naming the closest valid name otherwise."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    if key in _BY_NAME:
        return _BY_NAME[key]
    hint = difflib.get_close_matches(key, EXPRESSION_NAMES, n=1)
    did = f" (did you mean '{hint[0]}'?)" if hint else ""
    raise ExpressionError(f"unknown expression '{name}'{did}; known expressions: {', '.join(EXPRESSION_NAMES)}")


def expression_index(name: str) -> int:
    return EXPRESSION_NAMES.index(get_expression(name).name)


# ---- CLIP embeddings of the descriptors, cached per text encoder ------------------------------------------

_FORMAT = "idto3d.expressions/1"


def expression_cache_dir() -> Path:
    """``$IDTO3D_CACHE/expressions``, or ``~/.cache/idto3d/expressions`` when ``IDTO3D_CACHE`` is unset."""
    root = os.environ.get("IDTO3D_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "idto3d") / "expressions"


def text_encoder_fingerprint(text_encoder: Any, tokenizer: Any) -> str:
    """A hash of what decides the embeddings: encoder config (minus paths/versions), vocabulary, weights,
    descriptors. Hashing the weights costs ~0.5 s for SD1.5's CLIP; it is done once per loaded prior."""
    import torch

    h = hashlib.blake2b(digest_size=20)
    cfg = {k: v for k, v in text_encoder.config.to_dict().items()
           if not k.startswith("_") and k not in ("transformers_version", "name_or_path")}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([e.descriptor for e in EXPRESSIONS]).encode())
    for name, t in sorted(text_encoder.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _compute(text_encoder: Any, tokenizer: Any) -> torch.Tensor:
    import torch

    ids = tokenizer([e.descriptor for e in EXPRESSIONS], padding="max_length",
                    max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    device = next(text_encoder.parameters()).device
    with torch.no_grad():
        pooled = text_encoder(ids.to(device)).pooler_output
    return pooled.float().cpu()


def expression_embeddings(text_encoder: Any, tokenizer: Any, cache_dir: str | Path | None = None,
                          fingerprint: str | None = None) -> torch.Tensor:
    """CLIP pooled embeddings of all descriptors, ``[len(EXPRESSIONS), D]`` float32 on CPU, in
    ``EXPRESSIONS`` order; read from the cache when present, computed and cached otherwise."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from idto3d.atomic import atomic_write

    key = fingerprint or text_encoder_fingerprint(text_encoder, tokenizer)
    path = Path(cache_dir) if cache_dir is not None else expression_cache_dir()
    path = path / f"{key}.safetensors"
    names = json.dumps(list(EXPRESSION_NAMES))
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") == _FORMAT and meta.get("names") == names:
                    return f.get_tensor("embeddings")
        except Exception:  # a corrupt cache entry is recomputed, never trusted
            pass
    emb = _compute(text_encoder, tokenizer)
    meta = {"format": _FORMAT, "names": names, "fingerprint": key,
            "model": str(getattr(text_encoder.config, "_name_or_path", ""))}
    try:
        atomic_write(path, lambda p: save_file({"embeddings": emb.contiguous()}, str(p), metadata=meta))
    except OSError:
        pass  # a read-only cache only costs a recomputation next time
    return emb
