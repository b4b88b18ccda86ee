"""The run folder as a whole: one command at a time (a lock), its config and inputs checked before anything is
written or removed, a start-over (``--overwrite``) that removes only what idto3d wrote, and no folder left behind
by a command that failed before computing anything. What goes inside is named by ``core.run_layout``; what is
ours, and what each output was made from, by ``core.run_manifest``.

A command uses it as::

    with open_run(out, console) as run:
        run.check(cfg, inputs, overwrite)      # refuses another config/person before any write
        ...validate the inputs (identity, priors)...
        run.begin(cfg, inputs, overwrite)      # start over if asked, then write config.yaml
        ...the stages...
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from idto3d.core.atomic import recording_writes, remove_stale_temps
from idto3d.core.config import Config, dump_config, load_config
from idto3d.core.errors import IdtoError
from idto3d.core.run_layout import RunLayout
from idto3d.core.run_lock import RunLock
from idto3d.core.run_manifest import WAYS_OUT, RunManifest, file_digest

def describe_inputs(inputs: Sequence[str | Path]) -> dict[str, Any]:
    """What a run is made from: the content digest of each photo (folders expanded), or of the identity file."""
    from idto3d.identity.photos import collect_photos

    paths = [Path(p) for p in inputs]
    if len(paths) == 1 and paths[0].suffix.lower() == ".safetensors":
        if not paths[0].is_file():
            raise IdtoError(f"identity file not found: {paths[0]}")
        return {"kind": "identity", "files": [{"name": paths[0].name, "sha256": file_digest(paths[0])}]}
    return {"kind": "photos", "files": [{"name": p.name, "sha256": file_digest(p)} for p in collect_photos(paths)]}


def _same_config(path: Path, cfg: Config) -> bool:
    """Whether the folder's config file is ``cfg``, read with today's defaults: a key added since (at its default)
    is not a change. An unreadable file is a different config."""
    try:
        return dump_config(load_config(None, path)) == dump_config(cfg)
    except Exception:  # noqa: BLE001 - any unreadable or invalid config.yaml simply differs
        return False


def _inputs_differ(old: dict[str, Any] | None, new: dict[str, Any] | None, layout: RunLayout) -> str | None:
    """What differs between the inputs a run was made from and this command's (None: the same)."""
    if old is None or new is None:
        return None
    if old.get("priors") is not None and new.get("priors") is not None and old["priors"] != new["priors"]:
        changed = [k for k in sorted(set(old["priors"]) | set(new["priors"]))
                   if old["priors"].get(k) != new["priors"].get(k)]
        return "other priors (" + ", ".join(f"{k}: {old['priors'].get(k)} -> {new['priors'].get(k)}"
                                            for k in changed) + ")"
    digests = [f["sha256"] for f in new.get("files", [])]
    if digests == [f["sha256"] for f in old.get("files", [])]:
        return None
    # The run's own identity file given back to it (resuming from the identity) is the same person.
    if new.get("kind") == "identity" and layout.identity.is_file() and digests == [file_digest(layout.identity)]:
        return None
    return "other photos (" + ", ".join(f["name"] for f in old.get("files", [])) + ")"


_FS_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EDQUOT}


def _os_error(exc: OSError, path: Path) -> IdtoError:
    hint = ("free some space and run the same command again to resume" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
            else "choose another --out")
    return IdtoError(f"cannot write {exc.filename or path}: {os.strerror(exc.errno or 0)}; {hint}")


def _make_folders(root: Path) -> list[Path]:
    """Create ``root`` and its missing parents; returns the folders created, outermost first."""
    if root.exists() and not root.is_dir():
        raise IdtoError(f"--out {root} is a file; give a folder for the run")
    missing = []
    p = root.absolute()
    while not p.exists():
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        raise IdtoError(f"cannot make the run folder {root}: {p} is a file, not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno not in _FS_ERRORS:
            raise
        raise _os_error(exc, root) from None
    return missing[::-1]


@dataclass
class RunFolder:
    """A run folder held by this command (see :func:`open_run`)."""

    layout: RunLayout
    manifest: RunManifest
    console: Console | None = None
    written: set[str] = field(default_factory=set)  # files this command wrote, relative to the root

    def _record(self, path: Path) -> None:
        self.manifest.record(path)
        try:
            self.written.add(Path(path).absolute().relative_to(self.layout.root.absolute()).as_posix())
        except ValueError:
            pass

    def has_results(self) -> bool:
        """Whether a stage left something to resume or reuse here (a fitted field, a checkpoint, a finished
        marker); the config, the identity and the face fit alone are remade in seconds."""
        lay = self.layout
        kept = (lay.init_field, lay.photo_texture, lay.export_done, *lay.stage_reports.values(),
                *(f for sds in (lay.geometry_sds, lay.texture_sds) for f in (sds.checkpoint, sds.previous_checkpoint)))
        return any(p.exists() for p in kept)

    def check(self, cfg: Config | None, inputs: dict[str, Any] | None, overwrite: bool) -> None:
        """Refuse, before anything is written, a folder that holds results of another config or other inputs."""
        if overwrite or not self.has_results():
            return
        cfg_path = self.layout.config
        if cfg is not None and cfg_path.exists() and not _same_config(cfg_path, cfg):
            raise IdtoError(f"{self.layout.root} holds a run with a different config; {WAYS_OUT}")
        differ = _inputs_differ(self.manifest.inputs, inputs, self.layout)
        if differ:
            raise IdtoError(f"{self.layout.root} holds a run made from {differ}; {WAYS_OUT}")

    def begin(self, cfg: Config | None, inputs: dict[str, Any] | None, overwrite: bool) -> None:
        """After the inputs are validated: start over if asked, then record the config and the inputs."""
        self.check(cfg, inputs, overwrite)
        if overwrite:
            self.start_over()
        if cfg is not None:
            text = dump_config(cfg)
            # An unchanged config is left alone, so it stays the run's first output.
            if not self.layout.config.exists() or not _same_config(self.layout.config, cfg):
                from idto3d.core.atomic import atomic_write_text

                atomic_write_text(self.layout.config, text)
        if inputs is not None and inputs != self.manifest.inputs:
            self.manifest.inputs = inputs
            self.manifest.save()

    def start_over(self) -> None:
        """Remove every file of ours here (recorded, or under a name the stages give their files), except what
        this command already wrote; name the rest, which stays."""
        lay = self.layout
        recorded = set(self.manifest.files)
        for rel in _files(lay.root):
            if rel in self.written or rel.startswith(".idto3d/"):
                continue
            if rel in recorded or lay.named_ours(rel):
                (lay.root / rel).unlink()
        self.manifest.files = [rel for rel in self.manifest.files if rel in self.written]
        self.manifest.inputs = None
        self.manifest.save()
        _remove_empty_folders(lay.root)
        others = self.foreign_files()
        if others and self.console is not None:
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            self.console.print(f"[yellow]warning:[/] --overwrite left {len(others)} file(s) idto3d did not write: "
                               f"{shown}", highlight=False, soft_wrap=True)

    def foreign_files(self) -> list[str]:
        """The files here that are not ours."""
        ours = set(self.manifest.files)
        return sorted(rel for rel in _files(self.layout.root)
                      if rel not in ours and not self.layout.named_ours(rel))


def _remove_empty_folders(root: Path) -> None:
    for d in sorted((p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()), key=lambda p: -len(p.parts)):
        if not any(d.iterdir()) and d != root:
            d.rmdir()


def _adopt_legacy(layout: RunLayout, manifest: RunManifest) -> None:
    """A folder made before manifests existed: its files under the stages' names are taken as ours."""
    manifest.files = sorted(rel for rel in _files(layout.root) if layout.named_ours(rel))
    manifest.save()


def _files(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()]


@contextmanager
def open_run(run_dir: str | Path, console: Console | None = None) -> Iterator[RunFolder]:
    """Hold ``run_dir`` for this command: created if missing, locked (a second command fails at once), stale temp
    files of a killed writer removed, every write recorded. A command that fails before computing anything leaves
    no folder it created; file-system errors become one ``IdtoError`` line."""
    layout = RunLayout(run_dir)
    created = _make_folders(layout.root)
    lock = RunLock(layout.lock, layout.root)
    run: RunFolder | None = None
    try:
        lock.acquire()
        remove_stale_temps(layout.root)
        manifest = RunManifest.load(layout.manifest, layout.root)
        if not layout.manifest.exists() and (layout.config.exists() or any(d.exists() for d in layout.derived)):
            manifest.legacy = True
            _adopt_legacy(layout, manifest)
        run = RunFolder(layout, manifest, console)
        with recording_writes(run._record):
            yield run
    except OSError as exc:
        _cleanup(created, run)
        if exc.errno not in _FS_ERRORS:
            raise
        raise _os_error(exc, layout.root) from None
    except BaseException:
        _cleanup(created, run)
        raise
    finally:
        lock.release()


def _cleanup(created: list[Path], run: RunFolder | None) -> None:
    if created and (run is None or not run.has_results()):
        shutil.rmtree(created[0], ignore_errors=True)


def prepare_run(run_dir: str | Path, cfg: Config, overwrite: bool = False) -> Path:
    """Open, check and begin a run folder in one go (for callers that drive the stages themselves, e.g. tests)."""
    with open_run(run_dir) as run:
        run.begin(cfg, None, overwrite)
    return run.layout.root


@contextmanager
def hold_runs(run_dirs: Sequence[str | Path]) -> Iterator[None]:
    """Hold existing run folders for a command that adds to them (``evaluate`` writes ``report/``): each locked,
    and what is written there recorded as ours. Folders that do not exist are left to the command to refuse."""
    with ExitStack() as stack:
        runs = []
        for d in dict.fromkeys(Path(r).resolve() for r in run_dirs):
            layout = RunLayout(d)
            if not layout.config.is_file():
                continue
            stack.enter_context(RunLock(layout.lock, d))
            manifest = RunManifest.load(layout.manifest, d)
            if not layout.manifest.exists():
                manifest.legacy = True
                _adopt_legacy(layout, manifest)
            runs.append(RunFolder(layout, manifest))
        for run in runs:
            stack.enter_context(recording_writes(run._record))
        yield
