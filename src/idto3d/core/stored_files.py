"""Reading what a run stored: a damaged or truncated file (a full disk, a copy cut short, a hand edit) is named
in one line, never shown as a loader's traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from idto3d.core.errors import IdtoError


class DamagedFileError(IdtoError):
    """A file a run stored cannot be read back."""

    def __init__(self, path: Path, reason: str, hint: str | None = None) -> None:
        self.path = path
        hint = hint or "pass --overwrite to start that stage over (or choose another --out)"
        super().__init__(f"{path} is damaged ({reason}); {hint}")


def _reason(exc: BaseException) -> str:
    """The loader's first sentence: enough to tell a truncated file from a foreign one, short enough for a line."""
    text = str(exc).strip().splitlines()
    return text[0].split(". ")[0].rstrip(".") if text else type(exc).__name__


def load_torch_file(path: str | Path, hint: str | None = None) -> Any:
    """``torch.load`` (tensors and plain containers only: never unpickles code), on the CPU."""
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # a truncated zip, a bad pickle stream, an unexpected type: all mean "damaged"
        raise DamagedFileError(path, _reason(exc), hint) from None


def read_json_file(path: str | Path, hint: str | None = None) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise DamagedFileError(path, _reason(exc), hint) from None


def load_npz_file(path: str | Path, hint: str | None = None) -> dict[str, Any]:
    """Every array of an ``.npz`` archive (no pickles), read whole."""
    import zipfile

    import numpy as np

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DamagedFileError(path, _reason(exc), hint) from None
