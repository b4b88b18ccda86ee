"""The batch's notice board: a small Ray actor (0 CPUs) the tasks tell when an attempt starts and ends.

The driver learns from it which rows are running, where (node, worker PID) and on which attempt: Ray's own
task states need the dashboard, which a local batch does not start.
"""

from __future__ import annotations

from typing import Any


class Board:
    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def started(self, name: str, pid: int, node: str, resources: dict[str, float], at: float) -> None:
        row = self.rows.setdefault(name, {"attempts": 0, "intervals": []})
        row["attempts"] += 1
        row.update(pid=pid, node=node, resources=resources, running=True)
        row["intervals"].append([at, None])  # an attempt killed with its worker never gets its end

    def ended(self, name: str, at: float) -> None:
        row = self.rows[name]
        row["running"] = False
        row["intervals"][-1][1] = at

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return self.rows
