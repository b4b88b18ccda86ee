"""Run a checked manifest on Ray: one task per identity, each the normal ``generate`` into ``OUT/<name>/``.

Ray is the scheduler (embedded on this machine by default, a cluster with ``address``); this module only
declares each task's resources, watches the tasks and records the results. Safety under retries comes from the
run folder: every step writes atomically and a finished step is reused, so a task Ray starts again after its
worker died resumes where the dead one stopped (the run folder must be on storage every node sees).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from idto3d.batch.live import BatchView, eta_seconds
from idto3d.batch.manifest import BatchOptions, BatchRow
from idto3d.batch.results import RowRecord, collect_run_outputs, counts, write_results
from idto3d.batch.task import NO_PHOTOS, RunSpec, evaluated_against, from_identity_file, one_line, run_identity
from idto3d.core.config import Config, dump_config
from idto3d.core.errors import IdtoError
from idto3d.core.run_layout import RunLayout

INSTALL_HINT = "idto3d batch needs Ray: pip install 'idto3d[batch]' (or pip install 'ray>=2.40')"
POLL_SECONDS = 0.5


def require_ray() -> Any:
    """The ``ray`` module, or the one-line install hint as a user error."""
    try:
        import ray
    except ImportError:
        raise IdtoError(INSTALL_HINT) from None
    return ray


@dataclass(frozen=True)
class BatchSettings:
    """How the tasks run: where (``address``: None = a local Ray, ``auto``, ``ray://host:port``) and with what."""

    address: str | None = None
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources each run holds
    max_retries: int = 3                                       # restarts of a task whose worker died

    def check(self) -> None:
        if self.cpus_per_run <= 0:
            raise IdtoError(f"--cpus-per-run must be > 0, got {self.cpus_per_run:g}")
        if self.gpus_per_run < 0 or any(v <= 0 for v in self.resources.values()):
            raise IdtoError("--gpus-per-run must be >= 0 and every --resources amount > 0")
        if self.max_retries < 0:
            raise IdtoError(f"--max-retries must be >= 0, got {self.max_retries}")

    @property
    def threads(self) -> int:
        """torch threads per run: its whole CPUs (at least 1)."""
        return max(int(self.cpus_per_run), 1)

    def needs(self) -> dict[str, float]:
        need = {"CPU": self.cpus_per_run, **self.resources}
        if self.gpus_per_run:
            need["GPU"] = self.gpus_per_run
        return need


def parse_resources(items: Sequence[str] | None) -> dict[str, float]:
    """``["fast_disk=1", "accel=0.5,licence=1"]`` -> ``{"fast_disk": 1.0, "accel": 0.5, "licence": 1.0}``."""
    out: dict[str, float] = {}
    for part in (p.strip() for item in items or [] for p in item.split(",")):
        if not part:
            continue
        name, sep, amount = part.partition("=")
        try:
            value = float(amount) if sep else 1.0
        except ValueError:
            value = float("nan")
        if not name.strip() or not value > 0 or name.strip() in ("CPU", "GPU"):
            raise IdtoError(f"--resources takes NAME=AMOUNT (a custom Ray resource, amount > 0; CPUs and GPUs "
                            f"have their own options), got {part!r}")
        out[name.strip()] = value
    return out


def run_is_finished(run_dir: Path, cfg: Config, inputs: Sequence[Path]) -> bool:
    """Made with this config from these photos (the run's manifest) and exported: re-running its ``generate``
    would do no work. Anything else goes to ``generate``, which resumes it or refuses it in one line."""
    from idto3d.core.run_manifest import RunManifest
    from idto3d.stages.export_stage import exported_files
    from idto3d.stages.run_folder import describe_inputs

    layout = RunLayout(run_dir)
    try:
        same = layout.config.read_text(encoding="utf-8") == dump_config(cfg)
        recorded = RunManifest.load(layout.manifest, layout.root).inputs or {}
        given = describe_inputs(inputs)
        done = exported_files(run_dir) is not None
    except (OSError, IdtoError):
        return False
    digests = [[f["sha256"] for f in x.get("files", [])] for x in (recorded, given)]
    return same and digests[0] == digests[1] and done


def _absolute(ref: str | None) -> str | None:
    """A prior given as a local folder, made absolute for the workers; a hub id stays as it is."""
    return str(Path(ref).resolve()) if ref and Path(ref).exists() else ref


def plan(rows: Sequence[BatchRow], out: Path, opts: BatchOptions) -> list[tuple[RunSpec, RowRecord]]:
    """One task spec and record per row; finished runs are marked done (skipped) here, before Ray starts."""
    planned = []
    for row in rows:
        run_dir = out.resolve() / row.name  # absolute: a worker's current folder is not the driver's
        spec = RunSpec(row.name, tuple(str(p) for p in row.inputs), str(run_dir), row.cfg, row.prompt,
                       _absolute(opts.normal_prior), _absolute(opts.albedo_prior), opts.evaluate)
        record = RowRecord(row.name, row.name)
        no_photos = from_identity_file(row.inputs)
        evaluated = not opts.evaluate or no_photos or evaluated_against(run_dir, row.inputs)
        if run_is_finished(run_dir, row.cfg, row.inputs) and evaluated:
            record.status, record.skipped = "done", True
            record.evaluation = (NO_PHOTOS if no_photos else "kept") if opts.evaluate else None
            collect_run_outputs(record, out)
        planned.append((spec, record))
    return planned


def _start_ray(ray: Any, settings: BatchSettings) -> bool:
    """Connect (or start a local Ray); True when this call started it (and so shuts it down)."""
    if ray.is_initialized():  # a caller (a test, a notebook, the bench) already holds a Ray session
        return False
    try:
        if settings.address:
            ray.init(address=settings.address, log_to_driver=True)
        else:
            ray.init(include_dashboard=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise IdtoError(f"cannot start or reach Ray at {settings.address or 'a local instance'}: "
                        f"{one_line(exc)}") from None
    return True


def _check_feasible(ray: Any, settings: BatchSettings, console: Console) -> None:
    """Ray waits forever for resources no node has: say so before submitting."""
    need = settings.needs()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(all(res.get(k, 0.0) >= v for k, v in need.items()) for res in nodes):
        return
    have = "; ".join(", ".join(f"{k} {v:g}" for k, v in sorted(res.items()) if not k.startswith(("node:", "memory",
                     "object_store"))) for res in nodes) or "no nodes"
    want = ", ".join(f"{k} {v:g}" for k, v in need.items())
    msg = f"no Ray node has what one run asks for ({want}); the nodes have: {have}"
    if settings.address:  # an autoscaling cluster may still add such a node
        console.print(f"[yellow]warning:[/] {msg}; waiting for the cluster to provide it", highlight=False)
        return
    raise IdtoError(msg + " (lower --cpus-per-run / --gpus-per-run, or start Ray with those resources)")


def _failure_line(ray: Any, exc: Exception, settings: BatchSettings) -> str:
    if isinstance(exc, ray.exceptions.RayTaskError):  # the task raised: a bug, not the row's input
        cause = getattr(exc, "cause", None)
        return f"internal error: {type(cause).__name__}: {one_line(cause)}" if cause is not None else \
            f"internal error: {one_line(exc)}"
    return (f"its worker died and Ray's {settings.max_retries} retries were used up ({type(exc).__name__}); "
            f"re-run the batch to resume it")


def _apply_board(records: dict[str, RowRecord], board: dict[str, dict[str, Any]]) -> None:
    for name, b in board.items():
        rec = records[name]
        rec.attempts, rec.node, rec.pid = b["attempts"], b["node"], b["pid"]
        rec.resources, rec.intervals = dict(b["resources"]), [list(i) for i in b["intervals"]]
        if rec.status in ("pending", "running"):
            rec.status = "running"


def run_batch(rows: Sequence[BatchRow], out: str | Path, settings: BatchSettings, opts: BatchOptions | None = None,
              *, console: Console | None = None, live: bool | None = None, manifest: str | Path | None = None
              ) -> list[RowRecord]:
    """Every row's ``generate`` as a Ray task; returns the records (also in ``OUT/batch.json`` / ``.html``)."""
    settings.check()
    out, opts, console = Path(out), opts or BatchOptions(), console or Console(stderr=True)
    out.mkdir(parents=True, exist_ok=True)
    planned = plan(rows, out, opts)
    records = {rec.name: rec for _, rec in planned}
    order = list(records.values())
    meta: dict[str, Any] = {"manifest": str(manifest) if manifest else None, "out": str(out.resolve()),
                            "engine": {"address": settings.address, "cpus_per_run": settings.cpus_per_run,
                                       "gpus_per_run": settings.gpus_per_run, "resources": settings.resources,
                                       "max_retries": settings.max_retries, "torch_threads": settings.threads}}
    todo = [(spec, rec) for spec, rec in planned if not rec.skipped]
    skipped = len(planned) - len(todo)
    if skipped:
        console.print(f"{skipped} of {len(planned)} identities already finished in {out}: reused", highlight=False)
    if not todo:  # nothing to run: Ray is not even started
        write_results(out, order, meta, final=True)
        return order
    ray = require_ray()
    started_ray = _start_ray(ray, settings)
    try:
        _check_feasible(ray, settings, console)
        meta["engine"]["cluster"] = {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")}
        _run_tasks(ray, todo, records, order, out, settings, meta, console, live)
    finally:
        if started_ray:
            ray.shutdown()
    return order


def _run_tasks(ray: Any, todo: list[tuple[RunSpec, RowRecord]], records: dict[str, RowRecord],
               order: list[RowRecord], out: Path, settings: BatchSettings, meta: dict[str, Any], console: Console,
               live: bool | None) -> None:
    from idto3d.batch.board import Board

    board = ray.remote(num_cpus=0)(Board).remote()
    task = ray.remote(run_identity)
    t0 = time.time()
    refs = {task.options(num_cpus=settings.cpus_per_run, num_gpus=settings.gpus_per_run,
                         resources=settings.resources or None, max_retries=settings.max_retries,
                         retry_exceptions=False, name=f"idto3d-batch:{spec.name}"
                         ).remote(spec, settings.threads, board): rec for spec, rec in todo}
    pending, finished_here, last = list(refs), 0, None
    with BatchView(console, len(order), live) as view:
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_SECONDS)
            _apply_board(records, ray.get(board.snapshot.remote()))
            for ref in ready:
                rec = refs[ref]
                try:
                    result = ray.get(ref)
                    rec.status, rec.error, rec.wall_seconds = result["status"], result["error"], \
                        round(result["seconds"], 2)
                    rec.evaluation = result.get("evaluation")
                except ray.exceptions.RayError as exc:
                    rec.status, rec.error = "failed", _failure_line(ray, exc, settings)
                collect_run_outputs(rec, out)
                finished_here += 1
                view.note(f"{rec.name}: {rec.status}" + (f" - {rec.error}" if rec.error else "")
                          + (f" ({rec.attempts} attempts)" if rec.attempts > 1 else ""))
            c = counts(order)
            state = (c["done"], c["running"], c["failed"], tuple(r.attempts for r in order))
            view.update(c["done"], c["running"], c["failed"], eta_seconds(t0, finished_here, len(pending)))
            if state != last:  # batch.json follows the batch live: which row runs where, on which attempt
                meta["seconds"] = round(time.time() - t0, 2)
                write_results(out, order, meta, final=False)
                last = state
        _apply_board(records, ray.get(board.snapshot.remote()))
    meta["seconds"] = round(time.time() - t0, 2)
    write_results(out, order, meta, final=True)
