"""The batch's progress: a live rich bar on a terminal (done / running / failed, ETA), plain lines elsewhere."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def eta_seconds(started: float, finished_here: int, remaining: int, now: float | None = None) -> float | None:
    """Throughput so far (rows this batch finished per second) over the rows left; None before the first."""
    if finished_here <= 0:
        return None
    if remaining <= 0:
        return 0.0
    elapsed = (now if now is not None else time.time()) - started
    return elapsed / finished_here * remaining


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class BatchView:
    """``with BatchView(console, total) as view: view.update(done, running, failed, eta); view.note(line)``."""

    def __init__(self, console: Console, total: int, live: bool | None = None) -> None:
        self.console = console
        self.total = total
        self.live = console.is_terminal if live is None else live
        self._progress: Progress | None = None
        self._last: tuple | None = None

    def __enter__(self) -> BatchView:
        if self.live:
            self._progress = Progress(TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                      console=self.console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task("batch", total=self.total, info="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, done: int, running: int, failed: int, eta: float | None) -> None:
        state = (done, running, failed)
        info = f"done {done}  running {running}  failed {failed}  ETA {_clock(eta)}"
        if self._progress is not None:
            self._progress.update(self._task, completed=done + failed, info=info)
        elif state != self._last:  # a plain line per change, not per poll
            self.console.print(f"batch: {done + failed}/{self.total} finished, {info}", highlight=False)
        self._last = state

    def note(self, line: str) -> None:
        self.console.print(line, highlight=False, soft_wrap=True)
