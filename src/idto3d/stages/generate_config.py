"""The config one ``generate`` run resolves from its options: the CLI's ``generate`` and every row of ``batch``
build it here, so a batch row and the same ``generate`` command make the same run folder."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from idto3d.core.config import Config, load_config
from idto3d.core.errors import IdtoError


def expression_list(expressions: str | Sequence[str]) -> list[str]:
    """``"neutral, smile"`` or ``["neutral", "smile"]`` -> the names; at least one."""
    items = expressions.split(",") if isinstance(expressions, str) else [str(e) for e in expressions]
    names = [e.strip() for e in items if e.strip()]
    if not names:
        raise IdtoError("--expressions needs at least one name, e.g. neutral,smile")
    return names


def generate_config(preset: str | None = None, config: str | Path | None = None,
                    overrides: Sequence[str] | None = None, *, expressions: str | Sequence[str] | None = None,
                    device: str | None = None, precision: str | None = None, envmaps: str | Path | None = None,
                    priors: tuple[str | None, str | None] = (None, None)) -> Config:
    """Preset -> YAML -> ``--set`` overrides -> the options of ``generate`` (``priors``: the
    ``--normal-prior`` / ``--albedo-prior`` given, which decide the offline default expressions)."""
    extra = list(overrides or [])
    if device is not None:
        extra.append(f"runtime.device={device}")
    if precision is not None:
        extra.append(f"runtime.precision={precision}")
    if expressions is not None:
        extra.append(f"expressions=[{', '.join(expression_list(expressions))}]")
    if envmaps is not None:
        extra.append(f"texture.envmaps={json.dumps(str(envmaps))}")
    cfg = load_config(preset, config, extra)
    offline = not (priors[0] or priors[1] or cfg.prior.normal or cfg.prior.albedo)
    if offline and expressions is None and cfg.expressions == ["neutral"] and cfg.face_model.enabled:
        # Without priors the face model's expressions are the ones a run can make: export them all.
        from idto3d.face_model.offline_expressions import DEFAULT_OFFLINE_EXPRESSIONS

        extra.append(f"expressions=[{', '.join(DEFAULT_OFFLINE_EXPRESSIONS)}]")
        cfg = load_config(preset, config, extra)
    return cfg
