"""The loop both SDS stages share: resume, step, log, checkpoint, preview, finish.

A stage describes itself (:class:`SDSStage`) and supplies what is its own: one iteration (draw, render, score:
:class:`SDSStep`), its preview, and the extra fields of its ``done.json``. :func:`run_sds` owns the rest: the
checkpoint and the log of the run folder (:mod:`stages.stage_state`), the deferred finiteness checks and the
bad-step rule (:mod:`stages.step_log`), the checkpoint and preview cadence, the progress bar and ``stop_after``.
A run stopped at any point and started again ends bit-for-bit where an uninterrupted run ends.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console

from idto3d.core.atomic import atomic_write_text, note_write
from idto3d.core.stored_files import load_torch_file, read_json_file
from idto3d.core.config import CameraConfig, Config
from idto3d.core.device import rasterizer_name, reproducible_kernels, to_device
from idto3d.core.errors import IdtoError
from idto3d.core.progress import progress_bar
from idto3d.core.run_layout import SDSFiles
from idto3d.nn.state import load_field_state
from idto3d.render.backend import Rasterizer, get_rasterizer
from idto3d.render.camera import Camera, sample_orbit_cameras
from idto3d.stages.stage_state import StageCounters, StageState, usable_checkpoint
from idto3d.stages.step_log import StepLog, bad_steps_error, nonfinite_flag, step_unless


def conditioning_key(id_embedding: torch.Tensor | None, subject: str) -> str:
    """Ties a stage's checkpoint to the identity and prompt it was made for."""
    h = hashlib.sha256(subject.encode("utf-8"))
    if id_embedding is not None:
        h.update(id_embedding.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def preview_resolution(render_resolution: int) -> int:
    """Previews are for people: at least 128 px a view, at most 256 (cost grows with the square)."""
    return min(max(render_resolution, 128), 256)


def embedding_on(id_embedding: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """The identity embedding as the guidance takes it: float, on the run's device, outside autograd."""
    return None if id_embedding is None else to_device(id_embedding.detach().float(), device)


def stage_rasterizer(cfg: Config, device: torch.device) -> Rasterizer:
    """The rasteriser the stages render with: nvdiffrast where ``runtime.fast_paths`` allows it, else PyTorch's."""
    return get_rasterizer(rasterizer_name(cfg.render.backend, cfg.runtime.fast_paths), device)


def draw_views(sampler: torch.Generator, n_expressions: int, batch_size: int, cfg: CameraConfig) -> tuple[int, Camera]:
    """An expression index and ``batch_size`` orbit cameras, drawn on the host from the stage's sampler (the
    prompts need the azimuths there); the cameras go to the device afterwards."""
    e = int(torch.randint(n_expressions, (1,), generator=sampler))
    cams = sample_orbit_cameras(batch_size, cfg.elevation_deg, cfg.azimuth_deg, cfg.radius, cfg.fov_deg,
                                generator=sampler, target=cfg.target)
    return e, cams


@dataclass
class SDSStage:
    """What the runner needs to know of a stage. ``seed`` seeds both the sampler (expressions, cameras, lights)
    and, on a fresh run, torch's global generator."""

    name: str                      # "geometry" / "texture": progress title and error messages
    files: SDSFiles
    conditioned_on: str            # what ``key`` stands for, for the refusal of another run's folder
    key: str
    field: torch.nn.Module
    optimizer: torch.optim.Optimizer
    guidances: dict[str, Any]      # checkpoint key -> guidance (None = not used by this run)
    seed: int
    iterations: int
    checkpoint_every: int
    preview_every: int
    max_bad_steps: int
    hint: str                      # what to try, ending the error after ``max_bad_steps`` bad steps in a row
    log_every: int
    title: str                     # the progress bar's title on a fresh run
    sampler: torch.Generator = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.sampler = torch.Generator().manual_seed(self.seed)


@dataclass
class SDSStep:
    """One iteration's outcome: ``losses`` are device scalars, read at the log's flush; ``losses["loss"]`` is
    the one minimised. ``record`` holds the host fields of the log line; ``finite`` the guidance's own flag."""

    record: dict
    losses: dict[str, torch.Tensor]
    finite: torch.Tensor | None


@dataclass
class SDSProgress:
    iterations: int      # iterations of the run done so far (all calls together)
    skipped_steps: int   # non-finite steps skipped so far (all calls together)
    seconds: float       # optimisation wall time so far (all calls together)
    resumed_from: int    # the iteration this call started at (0 = fresh run)


def _refusal(files: SDSFiles, conditioned_on: str, what: str) -> str:
    return f"{files.dir} {what} a different {conditioned_on}; pass --overwrite to start over"


def finished(files: SDSFiles, key: str, field: torch.nn.Module, conditioned_on: str) -> SDSProgress | None:
    """A finished stage's counters, with its final field loaded into ``field``; None when not finished."""
    if not files.done.exists():
        return None
    info = read_json_file(files.done)
    if info.get("conditioning") != key:
        raise IdtoError(_refusal(files, conditioned_on, "was made for"))
    if usable_checkpoint(files.checkpoint, files.previous_checkpoint) != files.checkpoint:
        return None  # the final checkpoint is damaged or gone: the stage resumes from the one before it
    state = load_torch_file(files.checkpoint)
    load_field_state(field, state["field"], str(files.checkpoint))
    return SDSProgress(info["iterations"], info["skipped_steps"], info["seconds"], info["iterations"])


def write_done(files: SDSFiles, run: SDSProgress, key: str, expressions: list[str], **extra: Any) -> None:
    """Mark the stage finished; written last, after every other output of the stage."""
    atomic_write_text(files.done, json.dumps({
        "iterations": run.iterations, "skipped_steps": run.skipped_steps, "seconds": run.seconds,
        "conditioning": key, "expressions": expressions, **extra}, indent=2))


def run_sds(spec: SDSStage, step: Callable[[int], SDSStep], preview: Callable[[], None], *,
            stop_after: int | None = None, on_fresh: Callable[[], Any] | None = None,
            console: Console | None = None, progress: bool = True) -> SDSProgress:
    """Run (or resume) ``spec``'s optimisation until ``spec.iterations`` (the final preview included), or for
    ``stop_after`` iterations of this call. The checkpoint is saved either way; ``done.json`` is the caller's
    (:func:`write_done`), after its own outputs. ``on_fresh`` runs when there is no checkpoint to resume."""
    files = spec.files
    state = StageState(spec.field, spec.optimizer, spec.sampler, spec.guidances, spec.key)
    counters = state.begin(files.checkpoint, files.log, _refusal(files, spec.conditioned_on, "holds a run for"),
                           spec.seed, on_fresh=on_fresh, previous=files.previous_checkpoint)
    start = counters.iteration
    for g in spec.guidances.values():
        if g is not None:
            g.deferred_checks = True
    end = spec.iterations if stop_after is None else min(spec.iterations, start + max(stop_after, 0))
    with reproducible_kernels(next(spec.field.parameters()).device):
        _loop(spec, state, counters, step, preview, start, end, console, progress)
    _checkpoint(state, counters, files, end)
    if end == spec.iterations:
        preview()
    return SDSProgress(end, counters.skipped_steps, counters.seconds, start)


def _checkpoint(state: StageState, counters: StageCounters, files: SDSFiles, iteration: int) -> None:
    counters.iteration = iteration
    state.save(files.checkpoint, counters, previous=files.previous_checkpoint)


def _loop(spec: SDSStage, state: StageState, counters: StageCounters, step: Callable[[int], SDSStep],
          preview: Callable[[], None], start: int, end: int, console: Console | None, progress: bool) -> None:
    files, total = spec.files, spec.iterations

    def too_many(at: int, c: StageCounters) -> IdtoError:
        return bad_steps_error(spec.name, at, c, files.checkpoint, spec.hint)

    note_write(files.log)  # appended to in place (a killed run's tail is cut on resume), not written atomically
    with progress_bar(spec.title, end, console, enabled=progress, completed=start) as update, \
            files.log.open("a", encoding="utf-8") as log_file:
        log = StepLog(log_file, spec.log_every, counters, spec.max_bad_steps, too_many)
        for it in range(start, end):
            t0 = time.perf_counter()
            spec.optimizer.zero_grad(set_to_none=True)
            out = step(it)
            loss = out.losses["loss"]
            loss.backward()
            # No host read here: the flag is read at the log's flush, and a fused Adam skips on the device.
            bad = nonfinite_flag(spec.field.parameters(), loss, finite=out.finite)
            step_unless(spec.optimizer, bad)
            log.add(out.record, out.losses, bad, time.perf_counter() - t0)
            at_checkpoint, at_preview = log.after_step(it + 1, end, total, spec.checkpoint_every,
                                                       spec.preview_every)
            update(**log.shown)
            if at_checkpoint:
                _checkpoint(state, counters, files, it + 1)
            if at_preview:
                preview()
