"""``idto3d bench batch``: 4 short identities with ``idto3d batch`` on Ray, 1 worker vs 2 workers, in one run.

Three timings of the same 4 identities (scikit-image's astronaut, mirrored and cropped so every run computes
its own identity and fit), each from empty run folders, torch on 1 thread per identity:

- in-process: ``generate`` called 4 times in this process, no Ray (the baseline);
- Ray, 1 worker: ``run_batch`` on a fresh local Ray of 2 CPUs where each identity holds both "slots", so one
  runs at a time; its time minus the time spent inside the tasks' ``generate`` calls, per identity, is the
  overhead Ray adds (task submission, worker processes and their imports, the notice board, polling; target
  < 3 s). It is measured within the one case, so load from other jobs that slows ``generate`` does not enter it;
- Ray, 2 workers: the same with one slot each, two at a time; the speed-up over 1 worker is the ratio
  (target >= 1.7x on 2 cores).

Each Ray case starts its own Ray (its start-up time is its own row, not in the case's time) so both pay for
cold worker processes alike. On a machine other jobs share, the numbers are indicative only.
"""

from __future__ import annotations

import platform
import tempfile
import time
from pathlib import Path

import torch

from idto3d.core.config import load_config
from idto3d.core.errors import IdtoError

# The preview preset cut to seconds per identity (one expression, a small grid, few steps).
SHORT = ["template.iterations=40", "template.points_per_step=4000", "geometry.grid_resolution=32",
         "photo_texture.iterations=15", "photo_texture.resolution=128", "texture.resolution=128",
         "export.texture_size=128", "export.turntable_views=2", "export.turntable_resolution=64",
         "export.video=false", "expressions=[neutral]"]
SLOT = "idto3d_bench_slot"
TARGET_SPEEDUP = 1.7
TARGET_OVERHEAD_S = 3.0


def _photos(folder: Path, n: int) -> list[Path]:
    from PIL import Image, ImageOps
    from skimage import data

    base = Image.fromarray(data.astronaut())
    box = (32, 0, 480, 448)
    variants = [base, ImageOps.mirror(base), base.crop(box), ImageOps.mirror(base).crop(box)]
    paths = []
    for i in range(n):
        path = folder / f"person{i}.png"
        variants[i % len(variants)].save(path)
        paths.append(path)
    return paths


def _in_process(photos: list[Path], cfg, out: Path) -> float:
    from idto3d.stages.generate import generate

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        for i, photo in enumerate(photos):
            generate([photo], out / f"id{i}", cfg, progress=False)
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)


def _on_ray(rows, out: Path, slots_per_run: float) -> tuple[float, float, float]:
    """(Ray start-up s, batch s, s inside the tasks' generate) on a fresh local Ray of 2 CPUs and 2 slots."""
    import io

    import ray
    from rich.console import Console

    from idto3d.batch.engine import BatchSettings, run_batch

    t0 = time.perf_counter()
    ray.init(num_cpus=2, resources={SLOT: 2}, include_dashboard=False, log_to_driver=False)
    started = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        records = run_batch(rows, out, BatchSettings(cpus_per_run=1, resources={SLOT: slots_per_run}),
                            console=Console(file=io.StringIO()))
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    failed = [f"{r.name}: {r.error}" for r in records if r.status != "done"]
    if failed:
        raise IdtoError(f"bench batch: an identity failed ({'; '.join(failed)})")
    return started, seconds, sum(r.wall_seconds or 0.0 for r in records)


def bench_batch(identities: int = 4, overrides: list[str] | None = None) -> list[dict]:
    from idto3d.batch.engine import require_ray
    from idto3d.batch.manifest import BatchRow

    ray = require_ray()
    if ray.is_initialized():
        raise IdtoError("bench batch starts its own local Ray; run it outside a Ray session")
    cfg = load_config("preview", None, [*SHORT, *(overrides or [])])
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        photos = _photos(tmp_path, identities)
        rows = [BatchRow(f"id{i}", (p,), cfg) for i, p in enumerate(photos)]
        inproc = _in_process(photos, cfg, tmp_path / "in_process")
        start1, one, inside = _on_ray(rows, tmp_path / "ray1", 2.0)
        start2, two, inside2 = _on_ray(rows, tmp_path / "ray2", 1.0)
    n = identities
    meta = {"threads": 1, "torch": torch.__version__, "machine": platform.machine()}
    case = f"{n} identities ({len(cfg.expressions)} expression, short settings)"

    def row(name: str, seconds: float, baseline: str, ratio: float) -> dict:
        return {"stage": "batch", "case": f"{case}: {name}", "backend": "cpu", "ms": seconds * 1000.0,
                "baseline": baseline, "ratio": ratio, **meta}

    overhead = (one - inside) / n
    return [
        row("in-process generate, one after another (no Ray)", inproc, "in-process", 1.0),
        row("Ray, 1 worker", one, "in-process", one / inproc),
        row(f"Ray, 2 workers (speed-up over 1 worker; target >= {TARGET_SPEEDUP}x)", two, "Ray, 1 worker",
            one / two),
        row(f"Ray overhead per identity, (1 worker - inside its tasks) / {n} (target < {TARGET_OVERHEAD_S:.0f} s)",
            overhead, "task time per identity", overhead / (inside / n)),
        # Two identities at once on 2 free cores take about as long each as one alone; when other jobs hold
        # the cores, each takes longer and the speed-up above shrinks: this row tells the two apart.
        row("mean time inside a task, 2 workers (ratio: over 1 worker; ~1x when 2 cores are free)", inside2 / n,
            "Ray, 1 worker, inside a task", inside2 / inside),
        row("Ray start-up (ray.init, local, 2 CPUs), mean of the 2 cases", (start1 + start2) / 2, "in-process",
            (start1 + start2) / 2 / inproc),
    ]
