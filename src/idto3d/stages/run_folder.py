"""The run folder itself: its config written first, a folder made with another config refused, and a start-over
(``overwrite``) that clears everything the old config produced. What goes inside is named by ``core.run_layout``.

The run's initial field (``geometry/init.pt``) is ``stages.initial_geometry``'s.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from idto3d.core.atomic import atomic_write_text
from idto3d.core.config import Config, dump_config
from idto3d.core.errors import IdtoError
from idto3d.core.run_layout import RunLayout


def write_run_config(run_dir: Path, cfg: Config, overwrite: bool = False) -> None:
    """Write ``config.yaml``; refuse to reuse a folder made with a different config unless ``overwrite``."""
    path = RunLayout(run_dir).config
    text = dump_config(cfg)
    if path.exists() and not overwrite and path.read_text(encoding="utf-8") != text:
        raise IdtoError(f"{run_dir} holds a run with a different config; choose another --out, "
                        f"or pass --overwrite to start over there")
    atomic_write_text(path, text)


def prepare_run(run_dir: str | Path, cfg: Config, overwrite: bool = False) -> Path:
    """Write ``config.yaml`` (refusing a different config unless ``overwrite``); ``overwrite`` starts over."""
    layout = RunLayout(run_dir)
    if layout.root.exists() and not layout.root.is_dir():
        raise IdtoError(f"--out {layout.root} is a file; give a folder for the run")
    # Unchanged config: leave the file alone, so it stays the run's first output.
    if overwrite or not layout.config.exists() or layout.config.read_text(encoding="utf-8") != dump_config(cfg):
        write_run_config(layout.root, cfg, overwrite=overwrite)
    if overwrite:  # no stale checkpoint of the old config may be resumed
        for folder in layout.derived:
            shutil.rmtree(folder, ignore_errors=True)
    return layout.root

