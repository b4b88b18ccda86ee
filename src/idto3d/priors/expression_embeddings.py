"""CLIP embeddings of the expression descriptors (``core.expressions``), cached on disk per text encoder.

``expression_embeddings`` gives the pooled output of a base model's own text encoder for every descriptor,
cached in ``$IDTO3D_CACHE/expressions`` (default ``~/.cache/idto3d/expressions``), one safetensors file named
by a hash of the encoder's config, tokenizer vocabulary and weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idto3d.core.expressions import EXPRESSION_NAMES, EXPRESSIONS

if TYPE_CHECKING:
    import torch

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

    from idto3d.core.atomic import atomic_write

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
