"""What a run folder holds of ours, and what each stage's output was made from.

``RUN/.idto3d/manifest.json`` lists every file idto3d wrote in the folder (recorded by ``core.atomic`` before the
file appears) and the run's inputs (a digest of each photo, or of the identity file). ``--overwrite`` removes only
these files; anything else in the folder is the user's and stays.

Each stage's finished-marker JSON carries a *stage key* (:func:`stage_key`): digests of what produced the output
(identity, photos, the config sections the stage reads, the upstream stage's key, the package version). An output
is reused only when its key equals the key the current call would give it (:func:`check_stage_key`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idto3d.core.atomic import atomic_write_text
from idto3d.core.errors import IdtoError
from idto3d.core.stored_files import read_json_file

FORMAT = 1
WAYS_OUT = "pass --overwrite to start over there, or choose a new --out"
_WHAT = {"identity": "another identity embedding", "photos": "other photos", "config": "other settings",
         "upstream": "another earlier stage", "version": "another idto3d version", "priors": "other priors",
         "prompt": "another prompt"}


class StaleOutputError(IdtoError):
    """A finished output was made from other inputs than this call's."""


def digest(data: bytes | str) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()[:16]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def json_digest(obj: Any) -> str:
    return digest(json.dumps(obj, sort_keys=True, default=str))


def stage_key(**components: str) -> dict[str, str]:
    """A stage key: component name -> digest (see ``_WHAT`` for the names a refusal can explain)."""
    return dict(sorted(components.items()))


def check_stage_key(marker: Path, stored: Mapping[str, Any], current: Mapping[str, str], root: Path) -> None:
    """Refuse to reuse ``marker``'s output when its recorded key (``stored['key']``) differs from ``current``.

    A marker without a key was written by an idto3d that recorded none (before run keys existed): reused as before.
    """
    old = stored.get("key")
    if not isinstance(old, Mapping):
        return
    differ = [name for name in sorted(set(old) | set(current)) if old.get(name) != current.get(name)]
    if differ:
        names = [_WHAT.get(n, n) for n in differ]
        what = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        rel = marker.relative_to(root).as_posix() if marker.is_relative_to(root) else str(marker)
        raise StaleOutputError(f"{root}: {rel} was made from {what} than this command's; {WAYS_OUT}")


@dataclass
class RunManifest:
    path: Path
    root: Path
    files: list[str] = field(default_factory=list)
    inputs: dict[str, Any] | None = None
    legacy: bool = False  # the folder was made before manifests existed

    @classmethod
    def load(cls, path: Path, root: Path) -> RunManifest:
        if not path.exists():
            return cls(path, root)
        data = read_json_file(path, hint="delete it and pass --overwrite to start the run over")
        return cls(path, root, list(data.get("files", [])), data.get("inputs"), bool(data.get("legacy", False)))

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps({"format": FORMAT, "files": self.files, "inputs": self.inputs,
                                                 "legacy": self.legacy}, indent=1), record=False)

    def record(self, path: Path) -> None:
        """Note ``path`` (about to be written) as ours, when it lies in the run folder."""
        try:
            rel = Path(path).absolute().relative_to(self.root.absolute()).as_posix()
        except ValueError:
            return
        if rel not in self.files:
            self.files.append(rel)
            self.save()

    def record_all(self, paths: Iterable[Path]) -> None:
        for p in paths:
            self.record(p)

    def owned(self) -> list[Path]:
        return [self.root / rel for rel in self.files]
