"""Progress of long loops and of the pipeline's stages.

On a terminal: a rich progress bar (loss and iterations/s shown live), titled with the stage count
(``[3/7] geometry SDS``) and the overall ETA. When the output is not a terminal (a log file, CI, ``nohup``):
plain lines, flushed at once, one at the start and end of each loop and stage and at most one every
``IDTO3D_PROGRESS_EVERY`` seconds (default 10) in between, e.g.::

    [idto3d] stage 4/7 geometry SDS: it 120/400 (30%) loss=0.1234 2.31 it/s | stage ETA 2m01s | overall ETA ~5m40s

The overall ETA is rough: the current stage's remaining time plus, for each stage still to come, the mean
duration of the stages run so far (the stage count comes from ``pipeline``, opened by ``idto3d generate``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

from idto3d.core.errors import IdtoError

EVERY_ENV = "IDTO3D_PROGRESS_EVERY"
DEFAULT_EVERY_S = 10.0
PREFIX = "[idto3d]"
Clock = Callable[[], float]


def progress_every() -> float:
    """Seconds between two plain progress lines (``IDTO3D_PROGRESS_EVERY``, default 10)."""
    raw = os.environ.get(EVERY_ENV, "").strip()
    if not raw:
        return DEFAULT_EVERY_S
    try:
        every = float(raw)
    except ValueError:
        every = math.nan
    if not math.isfinite(every) or every < 0:
        raise IdtoError(f"{EVERY_ENV} must be a number of seconds >= 0, got {raw!r}")
    return every


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(max(seconds, 0.0)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


# ---------------------------------------------------------------- the pipeline's stages


@dataclass
class Pipeline:
    """The planned stages of one run, the current one and how long the finished ones took."""

    names: list[str]
    clock: Clock = time.monotonic
    index: int = 0                      # 1-based number of the current (or last) stage; 0 before the first
    durations: list[float] = field(default_factory=list)
    started: float | None = None

    def begin(self, name: str) -> None:
        if name not in self.names:
            self.names.insert(self.index, name)
        self.index = self.names.index(name) + 1
        self.started = self.clock()

    def end(self) -> float:
        took = self.clock() - (self.started or self.clock())
        self.durations.append(took)
        self.started = None
        return took

    def skip(self, name: str) -> None:
        """A planned stage this run turned out not to need (the count shrinks)."""
        if name in self.names[self.index:]:
            self.names.remove(name)

    def label(self) -> str:
        return f"stage {self.index}/{len(self.names)} {self.names[self.index - 1]}" if self.index else ""

    def short(self) -> str:
        return f"[{self.index}/{len(self.names)}]" if self.index else ""

    def overall_eta(self, stage_remaining: float | None) -> float | None:
        """The current stage's remaining seconds plus, per stage still to come, the mean of those run so far."""
        if stage_remaining is None and self.started is not None:
            return None  # the current stage has no rate yet
        elapsed = self.clock() - self.started if self.started is not None else 0.0
        remaining = stage_remaining or 0.0
        spans = self.durations + ([elapsed + remaining] if self.started is not None else [])
        later = len(self.names) - self.index
        if later and not spans:
            return None
        return remaining + later * (sum(spans) / len(spans) if spans else 0.0)


_PIPELINE: ContextVar[Pipeline | None] = ContextVar("idto3d_pipeline", default=None)


def _plain(console: Console) -> bool:
    return not console.is_terminal


def _emit(console: Console, line: str) -> None:
    """One plain line, flushed at once (a log read while the run goes on must show it)."""
    console.file.write(f"{PREFIX} {line}\n")
    console.file.flush()


@contextmanager
def pipeline(names: list[str], clock: Clock = time.monotonic) -> Iterator[Pipeline]:
    """The run's planned stages; ``pipeline_stage`` and ``progress_bar`` inside it show 'stage k/n'."""
    plan = Pipeline(list(names), clock)
    token = _PIPELINE.set(plan)
    try:
        yield plan
    finally:
        _PIPELINE.reset(token)


def current_pipeline() -> Pipeline | None:
    return _PIPELINE.get()


@contextmanager
def pipeline_stage(name: str, console: Console | None = None, enabled: bool = True) -> Iterator[None]:
    """One stage of the current pipeline: a line at its start and end (with the overall ETA)."""
    plan = _PIPELINE.get()
    if plan is None:
        yield
        return
    console = console or Console(stderr=True)
    plan.begin(name)
    label = plan.label()
    if enabled:
        _say(console, f"{label}: started")
    yield
    took = plan.end()
    if enabled:
        eta = plan.overall_eta(0.0) if plan.index < len(plan.names) else 0.0
        _say(console, f"{label}: done in {format_duration(took)} | overall ETA ~{format_duration(eta)}")


def _say(console: Console, line: str) -> None:
    if _plain(console):
        _emit(console, line)
    else:
        console.print(f"[bold]{line}[/]", highlight=False)


# ---------------------------------------------------------------- loops


@dataclass
class PlainLines:
    """The plain-mode progress of one loop: a line at the start, at most one per ``every`` seconds, one at the end."""

    description: str
    total: int
    write: Callable[[str], None]
    every: float
    clock: Clock = time.monotonic
    plan: Pipeline | None = None
    done: int = 0
    fields: dict[str, float] = field(default_factory=dict)
    started: float = 0.0
    last: float = 0.0
    resumed_at: int = 0                 # iterations done before this process started (a resumed run)

    def start(self) -> None:
        self.resumed_at = self.done
        self.started = self.last = self.clock()
        self.write(self._line())

    def update(self, advance: int = 1, **fields: float) -> None:
        self.done += advance
        self.fields.update(fields)
        if self.clock() - self.last >= self.every:
            self.last = self.clock()
            self.write(self._line())

    def finish(self) -> None:
        self.write(self._line())

    def _line(self) -> str:
        elapsed = self.clock() - self.started
        # Only this process's iterations make the rate: a resumed run's earlier ones took no time here.
        ran = self.done - self.resumed_at
        rate = ran / elapsed if elapsed > 0 and ran else None
        remaining = (self.total - self.done) / rate if rate else None
        where = f"{self.plan.label()} / {self.description}" if self.plan and self.plan.index else self.description
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        parts = [f"{where}: it {self.done}/{self.total}{pct}"]
        parts += [f"{k}={v:.4g}" for k, v in self.fields.items()]
        if rate:
            parts.append(f"{rate:.3g} it/s")
        line = " ".join(parts) + f" | stage ETA {format_duration(remaining if self.done else None)}"
        if self.plan is not None and self.plan.index:
            line += f" | overall ETA ~{format_duration(self.plan.overall_eta(remaining))}"
        return line


@contextmanager
def progress_bar(description: str, total: int, console: Console | None = None,
                 enabled: bool = True, completed: int = 0) -> Iterator[Callable[..., None]]:
    """Yield ``update(advance=1, **fields)``; fields (e.g. ``loss``) are shown after the bar (or in the line).

    ``completed``: iterations a resumed run did before; counted in the bar, not in the rate or the ETA.
    """
    if not enabled:
        yield lambda advance=1, **fields: None
        return
    console = console or Console(stderr=True)
    plan = _PIPELINE.get()
    if _plain(console):
        lines = PlainLines(description, total, lambda line: _emit(console, line), progress_every(), plan=plan,
                           done=completed)
        lines.start()
        yield lines.update
        lines.finish()
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    title = f"{plan.short()} {description}" if plan is not None and plan.index else description
    with Progress(*columns, console=console, transient=False) as prog:
        task = prog.add_task(title, total=total, info="", completed=completed)

        def update(advance: int = 1, **fields: float) -> None:
            t = prog.tasks[task]
            info = " ".join(f"{k}={v:.4g}" for k, v in fields.items())
            if t.speed:
                info += f" {t.speed:.2f} it/s"
            if plan is not None and plan.index:
                info += f" overall ETA ~{format_duration(plan.overall_eta(t.time_remaining))}"
            prog.update(task, advance=advance, info=info)

        yield update
