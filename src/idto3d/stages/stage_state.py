"""What an SDS stage checkpoints (the runner's part, see ``stages.sds_runner``) so that a stopped run, started
again, ends where an uninterrupted one ends: the field, Adam's moments, every random state (sampling, each
guidance's, torch's) and the counters."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rich.console import Console

from idto3d.core.atomic import atomic_write_bytes, atomic_write_text, note_write, torch_bytes
from idto3d.core.stored_files import DamagedFileError, load_torch_file
from idto3d.core.errors import IdtoError
from idto3d.nn.state import cpu_state_dict, load_field_state


_warn = Console(stderr=True)


@dataclass
class StageCounters:
    iteration: int = 0
    skipped_steps: int = 0
    bad_in_row: int = 0
    seconds: float = 0.0


@dataclass
class StageState:
    """The stateful objects of one stage; ``guidances`` maps checkpoint keys to guidance objects (None = absent)."""

    field: torch.nn.Module
    optimizer: torch.optim.Optimizer
    sampler: torch.Generator
    guidances: dict
    key: str  # ties the checkpoint to its conditioning (identity, prompt, geometry)

    def save(self, path: Path, counters: StageCounters, previous: Path | None = None) -> None:
        """Write the checkpoint; the one it replaces moves to ``previous`` (when given) first."""
        state = {"iteration": counters.iteration, "field": cpu_state_dict(self.field),
                 "optimizer": self.optimizer.state_dict(), "sampler": self.sampler.get_state(),
                 "torch_rng": torch.get_rng_state(), "skipped_steps": counters.skipped_steps,
                 "bad_in_row": counters.bad_in_row, "seconds": counters.seconds, "conditioning": self.key}
        state.update({name: g.state_dict() for name, g in self.guidances.items() if g is not None})
        data = torch_bytes(state)  # serialised first: a failure here leaves both files as they were
        if previous is not None and path.exists():
            keep_as_previous(path, previous)
        atomic_write_bytes(path, data)

    def restore(self, path: Path, refusal: str) -> StageCounters:
        """Load ``path`` into the objects; ``refusal`` is the error raised when it holds another conditioning."""
        state = load_torch_file(path)
        if state["conditioning"] != self.key:
            raise IdtoError(refusal)
        load_field_state(self.field, state["field"], str(path))
        fused = [g.get("fused") for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for g, f in zip(self.optimizer.param_groups, fused):  # a checkpoint's groups overwrite how we step
            g["fused"] = f
        self.sampler.set_state(state["sampler"])
        for name, g in self.guidances.items():
            if g is not None and name in state:
                g.load_state_dict(state[name])
        torch.set_rng_state(state["torch_rng"])
        return StageCounters(state["iteration"], state["skipped_steps"], state["bad_in_row"], state["seconds"])

    def begin(self, ckpt: Path, log: Path, refusal: str, seed: int,
              on_fresh: Callable[[], object] | None = None, previous: Path | None = None) -> StageCounters:
        """Resume from ``ckpt`` when it exists (from ``previous`` when ``ckpt`` is damaged or missing); else start
        fresh (``on_fresh()``, then seed torch). The log keeps only the lines of iterations before the start."""
        resume = usable_checkpoint(ckpt, previous)
        if resume is not None:
            counters = self.restore(resume, refusal)
        else:
            if on_fresh is not None:
                on_fresh()
            torch.manual_seed(seed)
            counters = StageCounters()
        truncate_log(log, counters.iteration)
        return counters


def keep_as_previous(path: Path, previous: Path) -> None:
    """Make ``previous`` the file ``path`` is now, while ``path`` stays in place (a hard link, else a copy)."""
    note_write(previous)
    tmp = previous.with_name(previous.name + ".link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, previous)


def usable_checkpoint(ckpt: Path, previous: Path | None) -> Path | None:
    """``ckpt`` when it loads; else ``previous`` when that exists (a warning says so); None when neither exists.
    A damaged ``ckpt`` with no previous one is a ``DamagedFileError``."""
    if ckpt.exists():
        try:
            load_torch_file(ckpt)
            return ckpt
        except DamagedFileError as exc:
            if previous is None or not previous.exists():
                raise
            _warn.print(f"[yellow]warning:[/] {exc.path} is damaged; resuming from {previous.name}", highlight=False,
                        soft_wrap=True)
            return previous
    return previous if previous is not None and previous.exists() else None


def truncate_log(path: Path, before: int) -> None:
    """Keep the log lines of iterations before ``before`` (a killed run may have logged past its checkpoint,
    or left half a line)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["it"] < before:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(k + "\n" for k in kept))
