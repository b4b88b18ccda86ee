"""The 2D priors: ID- and expression-aware Stable Diffusion for normals and albedo, and SDS guidance.

Names are imported lazily, so ``idto3d.core.config`` (which reads the expression vocabulary) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Prior": "model", "PriorSpec": "model", "build_prior": "model", "save_prior": "model", "load_prior": "model",
    "make_tiny_base_model": "tiny", "sd15_unet_config": "tiny",
    "SDSGuidance": "guidance", "OracleGuidance": "guidance", "GuidanceCond": "guidance", "SDSOutput": "guidance",
    "TimestepSchedule": "guidance", "SCHEDULES": "guidance",
    "EXPRESSIONS": "expressions", "get_expression": "expressions", "expression_index": "expressions",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
