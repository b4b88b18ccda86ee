"""A rich progress bar for long loops (loss and iterations/s shown live)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn


@contextmanager
def progress_bar(description: str, total: int, console: Console | None = None,
                 enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yield ``update(advance=1, **fields)``; fields (e.g. ``loss``) are shown after the bar."""
    if not enabled:
        yield lambda advance=1, **fields: None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as prog:
        task = prog.add_task(description, total=total, info="")

        def update(advance: int = 1, **fields: float) -> None:
            speed = prog.tasks[task].speed
            info = " ".join(f"{k}={v:.4g}" for k, v in fields.items())
            if speed:
                info += f" {speed:.2f} it/s"
            prog.update(task, advance=advance, info=info)

        yield update
