"""A batch manifest (CSV or YAML): one identity per row, every row checked before any compute.

Keys of a row: ``name`` (the run folder ``OUT/<name>/``), ``photos`` (files, folders or globs; ``;``-separated
in CSV, a string or list in YAML) or ``identity`` (one ``.safetensors`` file), and optionally ``prompt``,
``expressions`` (``neutral,smile``), ``preset`` and ``set`` (``key=value`` overrides, ``;``-separated in CSV; a
list or a mapping in YAML). Relative paths are relative to the manifest's folder.
"""

from __future__ import annotations

import csv
import difflib
import glob
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from idto3d.core.config import Config
from idto3d.core.errors import IdtoError
from idto3d.identity.photos import collect_photos
from idto3d.stages.generate_config import generate_config

KEYS = ("name", "photos", "identity", "prompt", "expressions", "preset", "set")
# A run folder name that is safe on every file system and never climbs out of OUT.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class BatchOptions:
    """What every row shares (the ``batch`` command's options); a row's ``preset`` / ``set`` win over these."""

    preset: str | None = None
    config: Path | None = None
    overrides: tuple[str, ...] = ()
    device: str | None = None
    precision: str | None = None
    normal_prior: str | None = None
    albedo_prior: str | None = None
    evaluate: bool = False          # evaluate each run against its own photos (``idto3d evaluate``)


@dataclass(frozen=True)
class BatchRow:
    """One valid row: what its ``generate`` run gets."""

    name: str
    inputs: tuple[Path, ...]        # photo files/folders (globs expanded) or one identity file, absolute
    cfg: Config
    prompt: str | None = None
    where: str = ""                 # "row 3" (CSV line / YAML item), for messages


@dataclass
class Problem:
    where: str
    name: str
    message: str


@dataclass
class Manifest:
    path: Path
    rows: list[BatchRow] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


class ManifestError(IdtoError):
    """The manifest itself cannot be read (not its rows: those are collected as ``Problem``s)."""


def _read_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ManifestError(f"manifest not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc}") from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames:
            raise ManifestError(f"{path}: empty CSV; the first line names the columns ({', '.join(KEYS)})")
        rows = [(f"line {reader.line_num}", {(k or "").strip(): v for k, v in row.items()}) for row in reader
                if any((v or "").strip() for v in row.values() if isinstance(v, str))]
    elif suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ManifestError(f"{path}: malformed YAML: {str(exc).splitlines()[0]}") from None
        if isinstance(data, dict) and set(data) == {"identities"}:
            data = data["identities"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ManifestError(f"{path}: expected a list of rows (mappings), or 'identities:' holding one")
        rows = [(f"item {i + 1}", {str(k): v for k, v in r.items()}) for i, r in enumerate(data)]
    else:
        raise ManifestError(f"manifest {path} must be a .csv, .yaml or .yml file")
    if not rows:
        raise ManifestError(f"{path} lists no identities")
    return rows


def _items(value: Any, sep: str = ";") -> list[str]:
    """A CSV cell (``a;b``) or a YAML string / list -> the non-empty items."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [s.strip() for s in str(value).split(sep) if s.strip()]


def _overrides(value: Any) -> list[str]:
    if isinstance(value, dict):  # YAML mapping: JSON is valid YAML flow, so every value type survives
        return [f"{k}={json.dumps(v)}" for k, v in value.items()]
    return _items(value)


def _photos(items: list[str], base: Path) -> list[Path]:
    """Files, folders and globs (relative to ``base``) -> existing paths; raises for any that is missing."""
    out: list[Path] = []
    for item in items:
        pattern = str(base / Path(item).expanduser())
        if glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_file())
            if not found:
                raise IdtoError(f"no file matches {item}")
            out += found
        else:
            out.append(Path(pattern))
    collect_photos(out)  # every path exists, no folder is empty, no file is empty
    return [p.resolve() for p in out]


def _row(raw: dict[str, Any], base: Path, opts: BatchOptions, where: str) -> BatchRow:
    unknown = [k for k in raw if k not in KEYS]
    if unknown:
        hints = [f"{k} (did you mean '{m[0]}'?)" if (m := difflib.get_close_matches(k, KEYS, n=1)) else k
                 for k in unknown]
        raise IdtoError(f"unknown key(s) {', '.join(hints)}; a row has {', '.join(KEYS)}")
    name = str(raw.get("name") or "").strip()
    if not _NAME.match(name):
        raise IdtoError(f"name {name!r} must be 1-128 letters, digits, '.', '_' or '-' (not starting with '.')"
                        if name else "no name (the run folder's name)")
    photos, identity = _items(raw.get("photos")), str(raw.get("identity") or "").strip()
    if bool(photos) == bool(identity):
        raise IdtoError("give either photos or an identity file" if photos else "no photos and no identity file")
    if identity:
        path = (base / Path(identity).expanduser()).resolve()
        if path.suffix.lower() != ".safetensors" or not path.is_file():
            raise IdtoError(f"identity file not found or not .safetensors: {identity}")
        inputs = [path]
    else:
        inputs = _photos(photos, base)
    expressions = _items(raw.get("expressions"), sep=",") if isinstance(raw.get("expressions"), (list, tuple)) \
        else [e for part in _items(raw.get("expressions")) for e in part.split(",") if e.strip()]
    cfg = generate_config(str(raw.get("preset") or "").strip() or opts.preset, opts.config,
                          [*opts.overrides, *_overrides(raw.get("set"))], expressions=expressions or None,
                          device=opts.device, precision=opts.precision,
                          priors=(opts.normal_prior, opts.albedo_prior))
    prompt = str(raw.get("prompt") or "").strip() or None
    return BatchRow(name, tuple(inputs), cfg, prompt, where)


def read_manifest(path: str | Path, opts: BatchOptions | None = None) -> Manifest:
    """Every row of the manifest checked (paths, names, config); bad rows are collected, not raised."""
    path = Path(path)
    opts = opts or BatchOptions()
    manifest = Manifest(path)
    seen: dict[str, str] = {}
    for where, raw in _read_rows(path):
        name = str(raw.get("name") or "").strip()
        try:
            row = _row(raw, path.parent, opts, where)
        except IdtoError as exc:
            manifest.problems.append(Problem(where, name, str(exc)))
            continue
        key = name.casefold()  # case-insensitive file systems would merge "Anna" and "anna"
        if key in seen:
            manifest.problems.append(Problem(where, name, f"duplicate name (also {seen[key]})"))
            continue
        seen[key] = where
        manifest.rows.append(row)
    return manifest


def names(rows: Sequence[BatchRow]) -> list[str]:
    return [r.name for r in rows]
