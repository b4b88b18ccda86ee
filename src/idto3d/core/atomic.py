"""Atomic file writes: a crash mid-write never leaves a half-written output behind.

A file is written to a temp name beside its final path (``.<stem>.<pid>.<random>.tmp<suffix>``), flushed to disk
and renamed over the final path. A process killed between the two leaves only the temp file, which the next command
on that run folder removes (:func:`remove_stale_temps`, called with the folder's lock held). Writers that own a
folder (a run) register with :func:`recording_writes` to learn every path written through here.
"""

from __future__ import annotations

import io
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TEMP_MARK = ".tmp"
_recorders: list[Callable[[Path], None]] = []


def _temp_path(path: Path) -> Path:
    """A new, exclusive temp file beside ``path``, created with the process umask's permissions (0666 & ~umask,
    as a plain ``open`` would), keeping ``path``'s suffix so writers that pick a format by extension still work."""
    while True:
        tmp = path.parent / f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_MARK}{path.suffix}"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        if not directory:
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], Any], *, record: bool = True) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, flush it to disk, then rename it over ``path``.

    ``record``: tell the registered recorders (a run's manifest) about ``path`` before it appears, so a file is
    never on disk as ours without being known as ours.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if record:
        note_write(path)
    tmp_path = _temp_path(path)
    try:
        write(tmp_path)
        _fsync(tmp_path)
        os.replace(tmp_path, path)
        _fsync(path.parent, directory=True)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def atomic_write_bytes(path: str | Path, data: bytes, *, record: bool = True) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data), record=record)


def atomic_write_text(path: str | Path, text: str, *, record: bool = True) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), record=record)


def torch_bytes(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    return atomic_write_bytes(path, torch_bytes(obj))


def note_write(path: str | Path) -> None:
    """Tell the recorders about a file written (or moved) by other means than this module's writers."""
    for rec in list(_recorders):
        rec(Path(path))


@contextmanager
def recording_writes(recorder: Callable[[Path], None]) -> Iterator[None]:
    """Call ``recorder(path)`` for every path written through this module inside the block."""
    _recorders.append(recorder)
    try:
        yield
    finally:
        _recorders.remove(recorder)


def is_temp(path: Path) -> bool:
    """Whether ``path`` is one of our temp files (see :func:`_temp_path`)."""
    name = path.name
    return name.startswith(".") and f"{TEMP_MARK}{path.suffix}" in name and name.endswith(path.suffix)


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temp files a killed writer left under ``folder``; call only with the folder's lock held (no
    other writer can be mid-write there)."""
    stale = [p for p in folder.rglob(f".*{TEMP_MARK}*") if p.is_file() and not p.is_symlink() and is_temp(p)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
