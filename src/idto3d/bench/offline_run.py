"""``idto3d bench generate``: the whole offline ``generate`` on one photo (scikit-image's astronaut), per step.

Rows: the wall time of each step of one fresh run in a temporary folder (identity, face fit, template
regression, photo texture, export with turntables) and the total; ratios are over the identity step of the same
run. The issue's target is the total under 5 minutes on a 2-core machine with the ``preview`` preset.
"""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path

import torch

from idto3d.core.config import load_config

TARGET_SECONDS = 300.0


def bench_generate(preset: str = "preview", overrides: list[str] | None = None) -> list[dict]:
    from PIL import Image
    from skimage import data

    from idto3d.face_model.offline_expressions import DEFAULT_OFFLINE_EXPRESSIONS
    from idto3d.stages.generate import generate

    cfg = load_config(preset, None, [f"expressions=[{', '.join(DEFAULT_OFFLINE_EXPRESSIONS)}]",
                                     *(overrides or [])])
    with tempfile.TemporaryDirectory() as tmp:
        photo = Path(tmp) / "astronaut.png"
        Image.fromarray(data.astronaut()).save(photo)
        result = generate([photo], Path(tmp) / "run", cfg, progress=False)
    laps = dict(result.seconds)
    total = sum(laps.values())
    base = laps.get("identity") or 1.0
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine()}
    case = f"1 photo, {len(cfg.expressions)} expressions, {preset}"
    rows = [{"stage": "generate (offline)", "case": f"{case}: {name}", "backend": "cpu", "ms": s * 1000.0,
             "baseline": "identity step", "ratio": s / base, **meta} for name, s in laps.items()]
    rows.append({"stage": "generate (offline)", "case": f"{case}: total (target {TARGET_SECONDS:.0f} s)",
                 "backend": "cpu", "ms": total * 1000.0, "baseline": "identity step", "ratio": total / base, **meta})
    return rows
