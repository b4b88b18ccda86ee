"""Fine-tune a prior on rendered scans with the denoising objective L_simple (paper eq. 5).

``E_{x, eps, t} || eps - eps_theta(x_t, t, text, ID, expression) ||^2`` on VAE latents of the images,
optimising only the prior's adapters (``Prior.trainable_parameters``). HF ``accelerate`` runs the same
code on one CPU, one GPU or many (``accelerate launch -m idto3d.cli train-prior ...``).

Reproducibility: the data order, noise, timesteps and condition dropout of micro-batch ``m`` on process
``r`` are pure functions of ``(seed, m, r)``, so a run resumed from a checkpoint (adapter weights +
optimiser state, saved by ``accelerator.save_state``) continues exactly as an uninterrupted one.

Output folder::

    PRIOR_DIR/prior_config.json, adapters.safetensors   the latest prior (``load_prior(PRIOR_DIR)``)
    PRIOR_DIR/run.json                                   what was trained on what (checked on --resume)
    PRIOR_DIR/train_log.jsonl, loss.png                  per-step loss and its curve
    PRIOR_DIR/checkpoints/step_000500/                   accelerate state + trainable.safetensors
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from idto3d.atomic import atomic_write, atomic_write_text
from idto3d.config import Config, PriorTrainConfig
from idto3d.errors import IdtoError
from idto3d.priors.dataset import PriorDataset

CHECKPOINTS = "checkpoints"
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "trainer_state.json"
ID_DIMS = {"dlib": 128, "arcface": 512}
MAX_GRAD_NORM = 1.0  # as diffusers' training scripts
WEIGHT_DECAY = 1e-2  # AdamW's, as diffusers' training scripts
# Config keys that may change between a run and its resumption without changing its results.
_RESUMABLE_CHANGES = ("steps", "checkpoint_every", "keep_checkpoints", "num_workers")


class TrainError(IdtoError):
    """The training run cannot start or resume as asked."""


# --- randomness ------------------------------------------------------------------------------------


def _seed_for(*parts: Any) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(_seed_for(*parts))


class StepBatches:
    """Index lists for micro-batches ``start, start + 1, ...`` of one process, forever.

    The global sample stream is one seeded permutation of the data set per epoch, concatenated;
    micro-batch ``m`` takes ``batch_size * world`` consecutive samples of it and process ``rank`` its
    ``rank``-th share. Resuming at micro-batch ``m`` needs nothing but ``m``.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, world: int = 1, rank: int = 0):
        self.n, self.batch_size, self.seed, self.start, self.world, self.rank = n, batch_size, seed, start, world, rank
        self._perm: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(self.n, generator=_generator(self.seed, "epoch", epoch)))
        return self._perm[1]

    def batch(self, m: int) -> list[int]:
        first = (m * self.world + self.rank) * self.batch_size
        return [int(self._permutation(p // self.n)[p % self.n]) for p in range(first, first + self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        m = self.start
        while True:
            yield self.batch(m)
            m += 1


# --- the objective ---------------------------------------------------------------------------------


@dataclass
class DenoisingInputs:
    """One micro-batch ready for the UNet: noisy latents, their targets and the (dropped) conditions."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    text: torch.Tensor
    id_embedding: torch.Tensor
    exp_embedding: torch.Tensor
    keep_id: torch.Tensor  # [B] float, 0 where the ID condition is dropped (or absent)
    keep_exp: torch.Tensor  # [B] float


def drop_masks(batch_size: int, p: float, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Per-sample (drop_text, drop_id, drop_exp): all three with probability p, each alone with probability p."""
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    drop_all = u < p
    drop_text = drop_all | ((u >= p) & (u < 2 * p))
    drop_id = drop_all | ((u >= 2 * p) & (u < 3 * p))
    drop_exp = drop_all | ((u >= 3 * p) & (u < 4 * p))
    return drop_text, drop_id, drop_exp


@torch.no_grad()
def prepare_inputs(prior: Any, batch: dict, generator: torch.Generator, condition_dropout: float = 0.0
                   ) -> DenoisingInputs:
    """Encode images and conditions, draw noise and timesteps from ``generator`` (on the CPU, so every
    device draws the same numbers) and noise the latents."""
    device = next(prior.unet.parameters()).device
    images = batch["image"].to(device)
    B = images.shape[0]
    latents = prior.encode_images(images)
    sched = prior.noise_scheduler
    T = int(sched.config.num_train_timesteps)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(device, latents.dtype)
    timesteps = torch.randint(0, T, (B,), generator=generator).to(device)
    drop_text, drop_id, drop_exp = drop_masks(B, condition_dropout, generator)
    prompts = ["" if d else p for p, d in zip(batch["prompt"], drop_text.tolist())]
    text = prior.encode_text(prompts)
    exp = prior.encode_expressions(list(batch["expression"]))
    keep_id = (batch["has_id"].to(torch.bool) & ~drop_id).to(device, torch.float32)
    keep_exp = (~drop_exp).to(device, torch.float32)
    noisy = sched.add_noise(latents, noise, timesteps)
    kind = sched.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = sched.get_velocity(latents, noise, timesteps)
    else:
        raise TrainError(f"the base model's scheduler predicts {kind!r}; only epsilon and v_prediction train")
    return DenoisingInputs(noisy, timesteps, target, text, batch["id_embedding"].to(device, torch.float32),
                           exp, keep_id, keep_exp)


class DenoisingObjective(nn.Module):
    """What ``accelerator.prepare`` wraps: its ``forward`` is the UNet's noise prediction with per-sample
    condition switches (a dropped ID/expression gets lambda 0, which removes that branch exactly)."""

    def __init__(self, prior: nn.Module):
        super().__init__()
        self.prior = prior

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor, id_embedding: torch.Tensor,
                exp_embedding: torch.Tensor, keep_id: torch.Tensor, keep_exp: torch.Tensor) -> torch.Tensor:
        return self.prior.predict_noise(noisy, timesteps, text, id_embedding=id_embedding,
                                        exp_embedding=exp_embedding, lambda_id=keep_id, lambda_exp=keep_exp)


def denoising_loss(model: nn.Module, inputs: DenoisingInputs) -> torch.Tensor:
    """L_simple: mean squared error between the predicted and the true noise (or velocity)."""
    pred = model(inputs.noisy, inputs.timesteps, inputs.text, inputs.id_embedding, inputs.exp_embedding,
                 inputs.keep_id, inputs.keep_exp)
    return torch.nn.functional.mse_loss(pred.float(), inputs.target.float())


# --- checkpoints and logs --------------------------------------------------------------------------


def save_trainable(prior: Any, path: Path) -> None:
    """The prior's adapter weights (all that training changes) as safetensors."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in prior.adapter_state_dict().items()}
    atomic_write(path, lambda p: save_file(tensors, str(p)))


def load_trainable(prior: Any, path: Path) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise TrainError(f"checkpoint {path.parent} lacks {path.name}; it is incomplete: delete it and resume")
    prior.load_adapter_state_dict(load_file(path), source=str(path))


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    folder = out / CHECKPOINTS
    found = []
    for d in folder.glob("step_*") if folder.is_dir() else []:
        if d.is_dir() and d.name[5:].isdigit() and (d / STATE_FILE).is_file():
            found.append((int(d.name[5:]), d))
    return sorted(found)


def _read_log(path: Path) -> list[dict]:
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


# --- the loop --------------------------------------------------------------------------------------


@dataclass
class TrainReport:
    out: Path
    steps: int
    start_step: int
    final_loss: float | None
    seconds: float
    trainable_parameters: int
    samples: int


def _run_description(domain: str, data: Path, base_model: str, init: str | None, ip_adapter: str | None,
                     cfg: Config) -> dict:
    train = {k: v for k, v in asdict(cfg.prior.train).items() if k not in _RESUMABLE_CHANGES}
    return {"domain": domain, "data": str(Path(data).resolve()), "base_model": str(base_model),
            "init": None if init is None else str(init), "ip_adapter": None if ip_adapter is None else str(ip_adapter),
            "adapter": asdict(cfg.prior.adapter), "train": train}


def _check_run(out: Path, run: dict, resume: bool) -> int:
    """Write or compare ``run.json``; the step to start from."""
    path = out / "run.json"
    ckpts = list_checkpoints(out)
    if not resume:
        if ckpts or path.is_file():
            raise TrainError(f"{out} already holds a training run; pass --resume to continue it, "
                             "or choose a new --out folder")
        atomic_write_text(path, json.dumps(run, indent=2) + "\n")
        return 0
    if not path.is_file():
        raise TrainError(f"nothing to resume in {out} (no run.json); start without --resume")
    old = json.loads(path.read_text(encoding="utf-8"))
    diff = [k for k in run if old.get(k) != run[k]]
    if "train" in diff:
        diff.remove("train")
        diff += [f"prior.train.{k}" for k in run["train"] if old["train"].get(k) != run["train"][k]]
    if diff:
        raise TrainError(f"--resume with different settings than the run in {out}: {', '.join(diff)}; only "
                         f"prior.train.{{{', '.join(_RESUMABLE_CHANGES)}}} may change")
    return ckpts[-1][0] if ckpts else 0


def _build(domain: str, base_model: str, init: str | Path | None, ip_adapter: str | Path | None, id_dim: int,
           cfg: Config):
    from idto3d.priors import model as prior_model

    if init is not None:
        prior = prior_model.load_prior(init)
        if prior.spec.domain != domain:
            raise TrainError(f"--init {init} is a {prior.spec.domain} prior; fine-tune it as "
                             f"'{prior.spec.domain}' or start a {domain} prior from the base model")
    else:
        # A local base folder with its own vae/ keeps it; otherwise (hub ids, "noVAE" checkpoints)
        # prior.vae names the VAE, as IP-Adapter FaceID's example pairs Realistic Vision with sd-vae-ft-mse.
        vae = None if (Path(base_model) / "vae").is_dir() else cfg.prior.vae
        prior = prior_model.build_prior(base_model, domain, id_dim, cfg.prior.adapter, vae=vae)
    if ip_adapter is not None:
        prior.load_ip_adapter_faceid(ip_adapter)
    return prior


def train_prior(
    domain: str,
    data: str | Path,
    out: str | Path,
    cfg: Config,
    *,
    base_model: str | Path | None = None,
    init: str | Path | None = None,
    ip_adapter: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    console: Any = None,
) -> TrainReport:
    """Fine-tune a ``domain`` prior on ``data`` (a ``render-dataset`` folder) into ``out``; see the module doc."""
    try:
        return _train_prior(domain, data, out, cfg, base_model=base_model, init=init, ip_adapter=ip_adapter,
                            resume=resume, progress=progress, console=console)
    finally:
        # accelerate keeps its settings (mixed precision, ...) in process-wide singletons that refuse to
        # change; clear them so a later call in this process (tests, notebooks) may use other settings.
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state()
        GradientState._reset_state()


def _train_prior(
    domain: str,
    data: str | Path,
    out: str | Path,
    cfg: Config,
    *,
    base_model: str | Path | None = None,
    init: str | Path | None = None,
    ip_adapter: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    console: Any = None,
) -> TrainReport:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from torch.utils.data import DataLoader

    from idto3d.pipeline.progress import progress_bar
    from idto3d.priors import model as prior_model

    tc: PriorTrainConfig = cfg.prior.train
    if domain not in ("normal", "albedo"):
        raise TrainError(f"unknown domain {domain!r}; choose normal or albedo")
    if tc.resolution % 8:
        raise TrainError(f"prior.train.resolution must be a multiple of 8 (the VAE's downsampling), "
                         f"got {tc.resolution}")
    out = Path(out)
    base = str(base_model if base_model is not None else cfg.prior.base_model)

    # Check the data before spending minutes on loading weights.
    dataset = PriorDataset(data, domain, tc.resolution)
    try:
        accelerator = Accelerator(
            mixed_precision=tc.mixed_precision,
            project_config=ProjectConfiguration(project_dir=str(out), automatic_checkpoint_naming=False),
            # A batch whose samples all drop the ID (or expression) leaves that branch without gradients.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
    except ValueError as exc:
        raise TrainError(f"cannot set up training with mixed_precision={tc.mixed_precision!r}: {exc}") from None

    main = accelerator.is_main_process
    run = _run_description(domain, Path(data), base, None if init is None else str(init),
                           None if ip_adapter is None else str(ip_adapter), cfg)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        start = _check_run(out, run, resume)
    accelerator.wait_for_everyone()
    if not main:
        start = _check_run(out, run, True) if resume else 0

    id_dim = dataset.id_dim if dataset.id_dim is not None else ID_DIMS[cfg.identity.backend]
    set_seed(tc.seed)  # fresh adapters are drawn from the global RNG
    prior = _build(domain, base, init, ip_adapter, id_dim, cfg)
    dataset.use_id_dim(int(prior.spec.id_dim))
    params = prior.trainable_parameters()
    n_trainable = sum(p.numel() for p in params)

    objective = DenoisingObjective(prior)
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=WEIGHT_DECAY)
    objective, optimizer = accelerator.prepare(objective, optimizer)

    def save_hook(models: list, weights: list, folder: str) -> None:
        # Only the adapters change; the frozen base model stays where it came from.
        if main:
            save_trainable(prior, Path(folder) / TRAINABLE_FILE)
        while weights:
            weights.pop()

    def load_hook(models: list, folder: str) -> None:
        load_trainable(prior, Path(folder) / TRAINABLE_FILE)
        while models:
            models.pop()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    log_path = out / "train_log.jsonl"
    if start > 0:
        accelerator.load_state(str(out / CHECKPOINTS / f"step_{start:06d}"))
    if main:
        # Drop log lines past the checkpoint: they are recomputed identically.
        kept = [r for r in _read_log(log_path) if r["step"] <= start]
        atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in kept))

    ga, world, rank = tc.gradient_accumulation, accelerator.num_processes, accelerator.process_index
    sampler = StepBatches(len(dataset), tc.batch_size, tc.seed, start=start * ga, world=world, rank=rank)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=tc.num_workers,
                        persistent_workers=tc.num_workers > 0)
    batches = iter(loader)

    def checkpoint(step: int) -> None:
        folder = out / CHECKPOINTS / f"step_{step:06d}"
        accelerator.wait_for_everyone()
        accelerator.save_state(str(folder))
        if main:
            atomic_write_text(folder / STATE_FILE, json.dumps({"step": step, "domain": domain}) + "\n")
            prior_model.save_prior(prior, out)
            for _, old in list_checkpoints(out)[:-tc.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            log = _read_log(log_path)
            if log:
                plot_loss(log, out / "loss.png", f"{domain} prior: L_simple")
        accelerator.wait_for_everyone()

    t0 = time.perf_counter()
    last = None
    objective.train()
    with progress_bar(f"train-prior {domain}", total=tc.steps, enabled=progress and main,
                      console=console) as update, (log_path.open("a", encoding="utf-8") if main else _Null()) as log:
        if start:
            update(advance=min(start, tc.steps))
        for step in range(start + 1, tc.steps + 1):
            total = torch.zeros((), device=accelerator.device)
            for micro in range(ga):
                m = (step - 1) * ga + micro
                batch = next(batches)
                inputs = prepare_inputs(prior, batch, _generator(tc.seed, "noise", m, rank), tc.condition_dropout)
                sync = accelerator.no_sync(objective) if micro < ga - 1 else _nullcontext()
                with sync, accelerator.autocast():
                    loss = denoising_loss(objective, inputs)
                    accelerator.backward(loss / ga)
                total += loss.detach() / ga
            accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            mean = float(accelerator.reduce(total, reduction="mean"))
            if not math.isfinite(mean):
                raise TrainError(f"the loss became {mean} at step {step}; lower prior.train.lr or use "
                                 "mixed_precision=no / bf16, then resume from the last checkpoint")
            last = mean
            if main:
                log.write(json.dumps({"step": step, "loss": mean, "lr": tc.lr,
                                      "seconds": round(time.perf_counter() - t0, 3)}) + "\n")
            update(loss=mean)
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                if main:
                    log.flush()
                checkpoint(step)
    if start >= tc.steps and main:
        prior_model.save_prior(prior, out)
    seconds = time.perf_counter() - t0
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainReport(out=out, steps=tc.steps, start_step=start, final_loss=last, seconds=seconds,
                       trainable_parameters=n_trainable, samples=len(dataset))


class _Null:
    def __enter__(self) -> "_Null":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def write(self, _: str) -> None:
        return None

    def flush(self) -> None:
        return None


def _nullcontext():
    from contextlib import nullcontext

    return nullcontext()
