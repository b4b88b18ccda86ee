"""What one Ray task runs: the normal ``generate`` into ``OUT/<name>/``, in the worker process.

A user-input error (no face, two people, a bad prior) is the row's result, not an exception: Ray must not retry
it, and the other rows go on. Anything else propagates, so a dead worker is retried by Ray (``max_retries``) and
the retry resumes from the run folder's checkpoints, as a re-run of ``generate`` does.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from idto3d.core.config import Config
from idto3d.core.errors import IdtoError


@dataclass(frozen=True)
class RunSpec:
    """One row's run, as the task receives it (plain, picklable values)."""

    name: str
    inputs: tuple[str, ...]
    run_dir: str
    cfg: Config
    prompt: str | None = None
    normal_prior: str | None = None
    albedo_prior: str | None = None
    evaluate: bool = False          # then `evaluate` the run against its own photos once it is exported


def _assigned_resources() -> dict[str, float]:
    try:
        import ray

        return {k: float(v) for k, v in ray.get_runtime_context().get_assigned_resources().items()}
    except Exception:  # noqa: BLE001 - called outside Ray (the bench's in-process baseline): nothing assigned
        return {}


def one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def run_identity(spec: RunSpec, threads: int, board: Any = None) -> dict[str, Any]:
    """``generate`` for one row with torch on ``threads`` threads; ``board`` (a ``Board`` actor) hears when it
    starts and ends. Returns the row's status, its error line when its input was bad, and its wall time."""
    import torch

    from idto3d.stages.generate import generate

    torch.set_num_threads(max(int(threads), 1))  # as many threads as the task's declared CPUs, no more
    started = time.time()
    if board is not None:
        board.started.remote(spec.name, os.getpid(), socket.gethostname(), _assigned_resources(), started)
    try:
        result = generate(list(spec.inputs), spec.run_dir, spec.cfg, normal_prior=spec.normal_prior,
                          albedo_prior=spec.albedo_prior, prompt=spec.prompt, progress=False)
        out = {"status": "done", "error": None, "exported": len(result.exported)} if result.exported else \
            {"status": "failed", "error": result.missing or "nothing was exported", "exported": 0}
        if spec.evaluate and out["status"] == "done":
            out["evaluation"] = evaluate_row(spec)
    except IdtoError as exc:
        out = {"status": "failed", "error": one_line(exc), "exported": 0}
    finally:  # also when generate raised a bug: only a dead worker leaves its attempt open
        if board is not None:
            board.ended.remote(spec.name, time.time())
    out["seconds"] = time.time() - started
    return out


NO_PHOTOS = "not evaluated: the row gives an identity file, not reference photos"


def from_identity_file(inputs: Sequence[str | Path]) -> bool:
    """A row given an identity file: it has no photos to evaluate against."""
    return any(Path(p).suffix.lower() == ".safetensors" for p in inputs)


def evaluated_against(run_dir: str | Path, inputs: Sequence[str | Path]) -> bool:
    """Whether the run's ``report/metrics.json`` measures its current export against exactly these photos (not
    another evaluation's references, not an export made since)."""
    from idto3d.core.run_layout import RunLayout
    from idto3d.identity.photos import collect_photos

    layout = RunLayout(run_dir)
    try:
        refs = json.loads(layout.metrics.read_text(encoding="utf-8")).get("references")
        current = layout.metrics.stat().st_mtime_ns >= layout.export_done.stat().st_mtime_ns
        photos = [str(p.resolve()) for p in collect_photos([Path(p) for p in inputs])]
    except (OSError, ValueError, IdtoError, AttributeError):
        return False
    return current and refs == photos


def evaluate_row(spec: RunSpec) -> str:
    """``idto3d evaluate RUN -r <the row's photos>`` with the row's config: "done", "kept" (already evaluated
    against these photos), or why not. An evaluation that cannot run (no face in a reference, an identity file
    instead of photos) is said in the row; the generated run stays done."""
    from idto3d.evaluate.run import evaluate_runs
    from idto3d.stages.run_folder import hold_runs

    if from_identity_file(spec.inputs):
        return NO_PHOTOS
    if evaluated_against(spec.run_dir, spec.inputs):
        return "kept"
    try:
        with hold_runs([spec.run_dir]):
            evaluate_runs([spec.run_dir], list(spec.inputs), spec.cfg, progress=False)
    except IdtoError as exc:
        return f"not evaluated: {one_line(exc)}"
    return "done"
