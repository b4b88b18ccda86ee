"""``idto3d bench identity``: per-photo CPU milliseconds for detection, alignment and embedding.

Photo: scikit-image's ``astronaut`` (512x512), saved as PNG. Baseline row: decoding that PNG
into an upright RGB array (``load_photo``), measured in the same run; every other row's ratio
is its time over that. dlib always; the ArcFace path (SCRFD + ArcFace on onnxruntime) when a
pack folder is given.
"""

from __future__ import annotations

import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from idto3d.bench.timing import time_ms as _time_ms
from idto3d.identity.face_backend import FaceBackend
from idto3d.identity.faces import choose_face, sort_by_size
from idto3d.identity.photos import load_photo

CPU = torch.device("cpu")


def _backend_rows(backend: FaceBackend, image: np.ndarray, case: str, base_ms: float, repeats: int) -> list[dict]:
    faces = sort_by_size(backend.detect(image), backend.confident_score)
    face = choose_face(faces, None, case, backend.confident_score).face
    aligned = backend.align(image, face)
    steps = {"detect": lambda: backend.detect(image), "align": lambda: backend.align(image, face),
             "embed": lambda: backend.embed(aligned)}
    rows = []
    for step, fn in steps.items():
        ms = _time_ms(fn, repeats, CPU)
        rows.append({"stage": "identity", "case": f"{step} ({case})", "backend": backend.name, "ms": ms,
                     "baseline": "decode+load", "ratio": ms / base_ms})
    total = sum(r["ms"] for r in rows)
    rows.append({"stage": "identity", "case": f"total per photo ({case})", "backend": backend.name, "ms": total,
                 "baseline": "decode+load", "ratio": total / base_ms})
    return rows


def bench_identity(pack: str | Path | None = None, repeats: int = 5) -> list[dict]:
    from skimage import data

    from idto3d.identity.dlib_backend import DlibBackend

    image_rgb = data.astronaut()
    case = f"astronaut {image_rgb.shape[1]}x{image_rgb.shape[0]}"
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "astronaut.png"
        Image.fromarray(image_rgb).save(png)
        base_ms = _time_ms(lambda: load_photo(png), repeats, CPU)
        image = load_photo(png)
    rows = [{"stage": "identity", "case": f"decode+load ({case} PNG)", "backend": "PIL", "ms": base_ms,
             "baseline": "decode+load", "ratio": 1.0}]
    rows += _backend_rows(DlibBackend(), image, case, base_ms, repeats)
    if pack is not None:
        from idto3d.identity.arcface_backend import ArcFaceBackend

        rows += _backend_rows(ArcFaceBackend(Path(pack)), image, case, base_ms, repeats)
    meta = {"threads": os.cpu_count(), "torch": torch.__version__, "machine": platform.machine(),
            "onnxruntime": metadata.version("onnxruntime"), "dlib": metadata.version("dlib-bin")}
    for r in rows:
        r.update(meta)
    return rows
