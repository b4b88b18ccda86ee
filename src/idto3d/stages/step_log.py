"""An SDS stage's per-iteration bookkeeping without waiting for the device every step.

A GPU runs the host's calls asynchronously; any read of a device value (``float(loss)``, ``bool(finite)``,
``.item()``) makes the host wait until every queued kernel has finished, so the next step's work cannot be queued
while this one runs. The stages therefore keep each step's loss terms and its "non-finite" flag as device
scalars and read them all at once every ``runtime.log_every`` steps (and before a checkpoint, a preview or the
end): one wait per flush instead of several per step. A non-finite step is skipped on the device: the flag is
the fused Adam step's ``found_inf`` (the mechanism ``torch.amp.GradScaler`` uses), which leaves the parameters,
the moments and the step count as they were. The counters (skipped steps, non-finite steps in a row) and the log
lines are then updated at the flush, in iteration order, exactly as a per-step check would have.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch

from idto3d.core.errors import IdtoError
from idto3d.stages.stage_state import StageCounters


def nonfinite_flag(parameters: Iterable[torch.nn.Parameter], *tensors: torch.Tensor | None,
                   finite: torch.Tensor | None = None) -> torch.Tensor:
    """A device scalar: 1.0 when any gradient of ``parameters`` or any of ``tensors`` holds NaN/inf, or the
    bool ``finite`` (e.g. ``SDSOutput.finite``) is False; else 0.0."""
    flags = [torch.isfinite(p.grad).all() for p in parameters if p.grad is not None]
    flags += [torch.isfinite(t).all() for t in tensors if t is not None]
    if finite is not None:
        flags.append(finite.reshape(()))
    if not flags:
        raise ValueError("nonfinite_flag needs at least one gradient or tensor")
    return torch.logical_not(torch.stack(flags).all()).float()


def bad_steps_error(stage: str, at: int, counters: StageCounters, ckpt: Path, hint: str) -> IdtoError:
    """The error that stops a stage after ``max_bad_steps`` non-finite steps in a row, naming its last checkpoint."""
    ckpt_at = torch.load(ckpt, map_location="cpu", weights_only=True)["iteration"] if ckpt.exists() else None
    where = f"the last good checkpoint (iteration {ckpt_at}) is in {ckpt}" if ckpt_at is not None \
        else "no checkpoint was written yet"
    return IdtoError(f"{stage} stage stopped at iteration {at}: {counters.bad_in_row} steps in a row had a non-finite "
                     f"loss or gradient ({counters.skipped_steps} skipped in all); {where}. {hint}")


def step_unless(optimizer: torch.optim.Optimizer, bad: torch.Tensor) -> None:
    """``optimizer.step()``, unless ``bad`` is 1. A fused optimizer decides on the device (``found_inf``, as
    ``torch.amp.GradScaler`` sets it); any other reads ``bad`` (a wait on a GPU) and skips on the host."""
    if all(g.get("fused") for g in optimizer.param_groups):
        optimizer.found_inf = bad
        optimizer.step()
    elif not bool(bad):
        optimizer.step()


@dataclass
class _Pending:
    record: dict
    values: dict[str, torch.Tensor]
    bad: torch.Tensor
    seconds: float  # the run's seconds after this step, as the host saw them


@dataclass
class StepLog:
    """Collects steps; ``flush`` reads them back, updates ``counters`` and writes one JSON line per step.

    ``too_many(iteration, counters)`` builds the error raised when ``max_bad`` steps in a row were skipped.
    """

    file: IO[str]
    every: int
    counters: StageCounters
    max_bad: int
    too_many: Callable[[int, StageCounters], Exception]
    pending: list[_Pending] = field(default_factory=list)
    shown: dict[str, float] = field(default_factory=dict)  # the last flushed loss and t, for the progress bar

    def add(self, record: dict, values: dict[str, torch.Tensor], bad: torch.Tensor, seconds: float) -> None:
        """``record``: the host fields of the log line; ``values``: device scalars (loss terms) read at the flush;
        ``seconds``: the host time of the step (on a GPU the queued work is counted at the flush)."""
        self.counters.seconds += seconds
        self.pending.append(_Pending(record, values, bad, self.counters.seconds))

    def due(self) -> bool:
        return len(self.pending) >= self.every

    def after_step(self, done: int, end: int, total: int, checkpoint_every: int,
                   preview_every: int) -> tuple[bool, bool]:
        """After ``done`` iterations (this call stops at ``end``, the run at ``total``): flush when due, and before a
        checkpoint, a preview or the end. Returns whether to checkpoint now (only after a good step) and whether
        to save a preview now."""
        at_checkpoint = done % checkpoint_every == 0 and done < end
        at_preview = done % preview_every == 0 and done < total
        if self.due() or at_checkpoint or at_preview or done == end:
            line = self.flush()
            self.shown = {"loss": line["loss"], "t": line["t"]}
        return at_checkpoint and self.counters.bad_in_row == 0, at_preview

    def flush(self) -> dict | None:
        """Read the pending steps (one device wait) and log them; returns the last step's line, or None."""
        if not self.pending:
            return None
        t0 = time.perf_counter()
        names = list(self.pending[0].values)
        stacked = torch.stack([torch.stack([p.values[n].detach().float() for n in names] + [p.bad.float()])
                               for p in self.pending])
        rows = stacked.cpu().tolist()
        self.counters.seconds += time.perf_counter() - t0  # the device's share of these steps
        pending, self.pending = self.pending, []
        pending[-1].seconds = self.counters.seconds
        line = None
        for p, row in zip(pending, rows):
            bad = row[-1] != 0.0
            c = self.counters
            c.skipped_steps += int(bad)
            c.bad_in_row = c.bad_in_row + 1 if bad else 0
            if bad:
                warnings.warn(f"iteration {p.record['it']}: the loss or its gradient is not finite (NaN/inf renders, "
                              f"or a prior that overflowed); the step was skipped", RuntimeWarning, stacklevel=2)
            line = {**p.record, **dict(zip(names, row[:-1])), "skipped": bad, "seconds": round(p.seconds, 4)}
            self.file.write(json.dumps(line) + "\n")
            if c.bad_in_row >= self.max_bad:
                self.file.flush()
                raise self.too_many(p.record["it"], c)
        self.file.flush()
        return line
