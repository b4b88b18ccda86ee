"""A training run's files: the adapter weights in checkpoints, the checkpoint list, the loss log and its plot.

Layout under the run's output folder (see ``train``)::

    checkpoints/step_000500/trainer_state.json, trainable.safetensors   (+ accelerate's state)
    train_log.jsonl                                                    one JSON line per step
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from idto3d.core.atomic import atomic_write
from idto3d.core.errors import IdtoError

CHECKPOINTS = "checkpoints"
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "trainer_state.json"
BASE_PREFIX = "base_unet."  # the base UNet's weights in a checkpoint of a run that trains it


class TrainError(IdtoError):
    """The training run cannot start or resume as asked."""


def save_trainable(prior: Any, path: Path) -> None:
    """The prior's adapter weights (all that training changes) as safetensors."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in prior.adapter_state_dict().items()}
    if prior.spec.unet_weights:  # prior.train.base: the base UNet is trained too
        tensors.update({BASE_PREFIX + k: v.detach().to("cpu").contiguous()
                        for k, v in prior.base_unet_parameters().items()})
    atomic_write(path, lambda p: save_file(tensors, str(p)))


def load_trainable(prior: Any, path: Path) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise TrainError(f"checkpoint {path.parent} lacks {path.name}; it is incomplete: delete it and resume")
    state = load_file(path)
    base = {k[len(BASE_PREFIX):]: state.pop(k) for k in list(state) if k.startswith(BASE_PREFIX)}
    if bool(base) != bool(prior.spec.unet_weights):
        raise TrainError(f"checkpoint {path.parent} {'holds' if base else 'lacks'} base UNet weights but this run "
                         f"{'does not train' if base else 'trains'} the base (prior.train.base)")
    prior.load_adapter_state_dict(state, source=str(path))
    if base:
        prior.load_base_unet_state_dict(base, source=str(path))


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    folder = out / CHECKPOINTS
    found = []
    for d in folder.glob("step_*") if folder.is_dir() else []:
        if d.is_dir() and d.name[5:].isdigit() and (d / STATE_FILE).is_file():
            found.append((int(d.name[5:]), d))
    return sorted(found)


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(log: list[dict], path: Path, title: str) -> None:
    """Loss per step and its running mean, as a PNG (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    steps = [r["step"] for r in log]
    loss = [r["loss"] for r in log]
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, loss, lw=0.6, alpha=0.5, label="loss")
    if len(loss) >= 2:
        k = max(1, len(loss) // 50)
        smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
        ax.plot(steps, smooth, lw=1.5, label=f"running mean ({k})")
    ax.set_xlabel("step")
    ax.set_ylabel("L_simple")
    ax.set_yscale("log" if loss and min(loss) > 0 else "linear")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))


__all__ = ["CHECKPOINTS", "STATE_FILE", "TRAINABLE_FILE", "TrainError", "list_checkpoints", "load_trainable",
           "plot_loss", "read_log", "save_trainable"]
