"""State-dict and optimiser-group helpers for the fields (checkpoints that load on any device)."""

from __future__ import annotations

import torch
from torch import nn

from idto3d.nn.encoding import check_encoding_state


def load_field_state(field: nn.Module, state: dict, source: str) -> None:
    """``field.load_state_dict(state)`` (any device: tensors are copied onto the field's), after checking that
    ``state`` holds the same encoding implementation (``source`` names the file in the error)."""
    check_encoding_state(field.encoding, state, str(source))
    field.load_state_dict(state)


def cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every tensor on the CPU: checkpoints that load on machines without the
    device they were trained on, with or without ``map_location``."""
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in module.state_dict().items()}


def field_parameter_groups(field: nn.Module, lr: float, encoding_lr_scale: float = 1.0,
                           code_lr_scale: float = 1.0, code_path: bool = False) -> list[dict]:
    """Optimizer groups of a field with an ``encoding``: the encoding's tables may need their own learning rate,
    and so may its expression ``codes`` (a third group only when ``code_lr_scale`` != 1, so checkpoints of
    two-group runs still load); with ``code_path`` that group also holds the layers only the codes pass through
    (``field.code_path_parameters()``)."""
    enc = list(field.encoding.parameters())
    codes = []
    if code_lr_scale != 1.0:
        codes = field.code_path_parameters() if code_path else [field.codes]
    own = {id(p) for p in enc + codes}
    rest = [p for p in field.parameters() if id(p) not in own]
    groups = [{"params": rest, "lr": lr}, {"params": enc, "lr": lr * encoding_lr_scale}]
    return groups + ([{"params": codes, "lr": lr * code_lr_scale}] if codes else [])
