"""What every benchmark shares: a median timer and the table the CLI prints."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from rich.table import Table


def time_ms(fn: Callable[[], None], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` calls after one warm-up (CUDA synchronised)."""
    fn()  # warm-up: allocator, lazy init, kernel selection
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def render_table(rows: list[dict]) -> Table:
    table = Table(title=f"idto3d bench (torch {rows[0]['torch'] if rows else ''}, "
                        f"{rows[0]['threads'] if rows else '?'} threads)")
    for col in ("stage", "case", "backend", "ms / call", "ratio", "baseline"):
        table.add_column(col, justify="right" if col in ("ms / call", "ratio") else "left")
    for r in rows:
        table.add_row(r["stage"], r["case"], r["backend"], f"{r['ms']:.1f}", f"{r['ratio']:.2f}x", r["baseline"])
    return table
