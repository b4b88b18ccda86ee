"""Fine-tune a prior on rendered scans with the denoising objective L_simple (paper eq. 5).

``E_{x, eps, t} || eps - eps_theta(x_t, t, text, ID, expression) ||^2`` on VAE latents of the images (or,
``prior.train.latent_mode=downsample``, on the images resized to the latent size, as SDS's downsample mode),
optimising the prior's adapters (``Prior.trainable_parameters``), and with ``prior.train.base`` the base UNet
too (a base built from config has random weights: adapters over it alone never make a denoiser). HF ``accelerate`` runs the same
code on one CPU, one GPU or many (``accelerate launch -m idto3d.cli train-prior ...``).

Reproducibility: the data order, noise, timesteps and condition dropout of micro-batch ``m`` on process
``r`` are pure functions of ``(seed, m, r)``, so a run resumed from a checkpoint (adapter weights +
optimiser state, saved by ``accelerator.save_state``) continues exactly as an uninterrupted one.
The objective and the seeded batches live in ``objective``, checkpoint and log files in ``train_state``.

Output folder::

    PRIOR_DIR/prior_config.json, adapters.safetensors   the latest prior (``load_prior(PRIOR_DIR)``)
    PRIOR_DIR/unet/                                      the trained base UNet (``prior.train.base`` only)
    PRIOR_DIR/run.json                                   what was trained on what (checked on --resume)
    PRIOR_DIR/train_log.jsonl, loss.png                  per-step loss and its curve
    PRIOR_DIR/checkpoints/step_000500/                   accelerate state + trainable.safetensors
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from idto3d.core.atomic import atomic_write_text
from idto3d.core.config import Config, PriorTrainConfig
from idto3d.core.device import reproducible_kernels
from idto3d.priors.training.dataset import PriorDataset
from idto3d.priors.training.objective import (
    DenoisingObjective, StepBatches, denoising_loss, generator_for, prepare_inputs,
)
from idto3d.priors.training.train_state import (
    CHECKPOINTS, STATE_FILE, TRAINABLE_FILE, TrainError, list_checkpoints, load_trainable, plot_loss, read_log,
    save_trainable,
)

ID_DIMS = {"dlib": 128, "arcface": 512}
MAX_GRAD_NORM = 1.0  # as diffusers' training scripts
WEIGHT_DECAY = 1e-2  # AdamW's, as diffusers' training scripts
# Config keys that may change between a run and its resumption without changing its results.
_RESUMABLE_CHANGES = ("steps", "checkpoint_every", "keep_checkpoints", "num_workers")


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
    from idto3d.priors import prior as prior_model

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
        return _train_prior(domain, Path(data), Path(out), cfg, base_model=base_model, init=init,
                            ip_adapter=ip_adapter, resume=resume, progress=progress, console=console)
    finally:
        # accelerate keeps its settings (mixed precision, ...) in process-wide singletons that refuse to
        # change; clear them so a later call in this process (tests, notebooks) may use other settings.
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state()
        GradientState._reset_state()


def _check_args(domain: str, tc: PriorTrainConfig) -> None:
    if domain not in ("normal", "albedo"):
        raise TrainError(f"unknown domain {domain!r}; choose normal or albedo")
    if tc.resolution % 8:
        raise TrainError(f"prior.train.resolution must be a multiple of 8 (the VAE's downsampling), "
                         f"got {tc.resolution}")


def _accelerator(tc: PriorTrainConfig, out: Path):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    try:
        return Accelerator(
            mixed_precision=tc.mixed_precision,
            project_config=ProjectConfiguration(project_dir=str(out), automatic_checkpoint_naming=False),
            # A batch whose samples all drop the ID (or expression) leaves that branch without gradients.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
    except ValueError as exc:
        raise TrainError(f"cannot set up training with mixed_precision={tc.mixed_precision!r}: {exc}") from None


def _start_step(accelerator: Any, out: Path, run: dict, resume: bool) -> int:
    """The step to start from; the main process writes (or checks) ``run.json`` before the others read it."""
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        start = _check_run(out, run, resume)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        start = _check_run(out, run, True) if resume else 0
    return start


def _prior_matching_data(dataset: PriorDataset, domain: str, base: str, init: str | Path | None,
               ip_adapter: str | Path | None, cfg: Config):
    """The prior to fine-tune, with its ID size matched to the data's (or the identity backend's)."""
    from accelerate.utils import set_seed

    id_dim = dataset.id_dim if dataset.id_dim is not None else ID_DIMS[cfg.identity.backend]
    set_seed(cfg.prior.train.seed)  # fresh adapters are drawn from the global RNG
    prior = _build(domain, base, init, ip_adapter, id_dim, cfg)
    dataset.use_id_dim(int(prior.spec.id_dim))
    _set_latents_and_base(prior, cfg)
    return prior


def _set_latents_and_base(prior: Any, cfg: Config) -> None:
    """Record the latent space trained on (SDS follows it) and, with ``prior.train.base``, unfreeze the base UNet."""
    import dataclasses

    tc = cfg.prior.train
    if tc.latent_mode == "downsample":
        latents = {"mode": "downsample", "size": int(cfg.prior.guidance.latent_size)}
        prior.spec = dataclasses.replace(prior.spec, latents=latents)
    elif prior.spec.latents:
        raise TrainError(f"this prior was trained on {prior.spec.latents['mode']} latents; set "
                         f"prior.train.latent_mode={prior.spec.latents['mode']} to fine-tune it")
    if tc.base or prior.spec.unet_weights:
        prior.train_base_unet()


def _register_state_hooks(accelerator: Any, prior: Any) -> None:
    """Checkpoints hold what training changes: the adapters (and the base UNet with prior.train.base)."""
    main = accelerator.is_main_process

    def save_hook(models: list, weights: list, folder: str) -> None:
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


def _restore(accelerator: Any, out: Path, start: int, log_path: Path) -> None:
    if start > 0:
        accelerator.load_state(str(out / CHECKPOINTS / f"step_{start:06d}"))
    if accelerator.is_main_process:
        # Drop log lines past the checkpoint: they are recomputed identically.
        kept = [r for r in read_log(log_path) if r["step"] <= start]
        atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in kept))


def _batches(dataset: PriorDataset, tc: PriorTrainConfig, start: int, accelerator: Any) -> Iterator:
    """Micro-batches from step ``start`` on, this process's share (see ``StepBatches``)."""
    from torch.utils.data import DataLoader

    sampler = StepBatches(len(dataset), tc.batch_size, tc.seed, start=start * tc.gradient_accumulation,
                          world=accelerator.num_processes, rank=accelerator.process_index)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=tc.num_workers,
                        persistent_workers=tc.num_workers > 0)
    return iter(loader)


@dataclass
class _Training:
    """One run's moving parts, as ``accelerator.prepare`` left them."""

    accelerator: Any
    prior: Any                      # the unwrapped prior (inputs, saving)
    objective: Any                  # DenoisingObjective, possibly wrapped for DDP
    optimizer: Any
    params: list[torch.Tensor]
    tc: PriorTrainConfig
    domain: str
    out: Path
    log_path: Path

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def learning_rate(tc: PriorTrainConfig, step: int) -> float:
    """The lr of optimiser step ``step`` (1-based): ``lr``, then ``lr x lr_decay_factor`` over the last
    ``lr_decay_fraction`` of the steps. A function of the step alone, so a resumed run follows the same
    schedule (resumed with more steps, the cooldown moves to the new end)."""
    cooldown = round(tc.steps * tc.lr_decay_fraction)
    return tc.lr * tc.lr_decay_factor if step > tc.steps - cooldown else tc.lr


def _train_step(t: _Training, step: int, batches: Iterator) -> float:
    """One optimiser step over ``gradient_accumulation`` micro-batches; the loss averaged over processes."""
    accelerator, tc = t.accelerator, t.tc
    ga, rank = tc.gradient_accumulation, accelerator.process_index
    total = torch.zeros((), device=accelerator.device)
    for micro in range(ga):
        m = (step - 1) * ga + micro
        batch = next(batches)
        inputs = prepare_inputs(t.prior, batch, generator_for(tc.seed, "noise", m, rank), tc.condition_dropout)
        sync = accelerator.no_sync(t.objective) if micro < ga - 1 else nullcontext()
        with sync, accelerator.autocast():
            loss = denoising_loss(t.objective, inputs)
            accelerator.backward(loss / ga)
        total += loss.detach() / ga
    accelerator.clip_grad_norm_(t.params, MAX_GRAD_NORM)
    for group in t.optimizer.param_groups:
        group["lr"] = learning_rate(tc, step)
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    mean = float(accelerator.reduce(total, reduction="mean"))
    if not math.isfinite(mean):
        raise TrainError(f"the loss became {mean} at step {step}; lower prior.train.lr or use "
                         "mixed_precision=no / bf16, then resume from the last checkpoint")
    return mean


def _checkpoint(t: _Training, step: int) -> None:
    """Save the state at ``step``, publish the prior, keep the newest ``keep_checkpoints``, redraw the curve."""
    from idto3d.priors import prior as prior_model

    folder = t.out / CHECKPOINTS / f"step_{step:06d}"
    t.accelerator.wait_for_everyone()
    t.accelerator.save_state(str(folder))
    if t.main:
        atomic_write_text(folder / STATE_FILE, json.dumps({"step": step, "domain": t.domain}) + "\n")
        prior_model.save_prior(t.prior, t.out)
        for _, old in list_checkpoints(t.out)[:-t.tc.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        log = read_log(t.log_path)
        if log:
            plot_loss(log, t.out / "loss.png", f"{t.domain} prior: L_simple")
    t.accelerator.wait_for_everyone()


def _train_loop(t: _Training, start: int, batches: Iterator, t0: float, progress: bool, console: Any
                ) -> float | None:
    """Steps ``start + 1 .. steps``, logged and checkpointed; the last step's loss (None if none ran)."""
    from idto3d.core.progress import progress_bar

    tc = t.tc
    last = None
    t.objective.train()
    # Only the main process writes the log; the others get None and never touch it.
    log_file = t.log_path.open("a", encoding="utf-8") if t.main else nullcontext()
    with progress_bar(f"train-prior {t.domain}", total=tc.steps, enabled=progress and t.main, console=console,
                      completed=min(start, tc.steps)) as update, log_file as log, \
            reproducible_kernels(t.accelerator.device):
        for step in range(start + 1, tc.steps + 1):
            last = _train_step(t, step, batches)
            if t.main:
                log.write(json.dumps({"step": step, "loss": last, "lr": learning_rate(tc, step),
                                      "seconds": round(time.perf_counter() - t0, 3)}) + "\n")
            update(loss=last)
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                if t.main:
                    log.flush()
                _checkpoint(t, step)
    return last


def _train_prior(domain: str, data: Path, out: Path, cfg: Config, *, base_model: str | Path | None,
                 init: str | Path | None, ip_adapter: str | Path | None, resume: bool, progress: bool,
                 console: Any) -> TrainReport:
    from idto3d.priors import prior as prior_model

    tc: PriorTrainConfig = cfg.prior.train
    _check_args(domain, tc)
    out = Path(out)
    base = str(base_model if base_model is not None else cfg.prior.base_model)

    # Check the data before spending minutes on loading weights.
    dataset = PriorDataset(data, domain, tc.resolution)
    accelerator = _accelerator(tc, out)
    run = _run_description(domain, Path(data), base, None if init is None else str(init),
                           None if ip_adapter is None else str(ip_adapter), cfg)
    start = _start_step(accelerator, out, run, resume)

    prior = _prior_matching_data(dataset, domain, base, init, ip_adapter, cfg)
    params = prior.trainable_parameters()
    objective = DenoisingObjective(prior)
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=WEIGHT_DECAY)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    _register_state_hooks(accelerator, prior)
    training = _Training(accelerator, prior, objective, optimizer, params, tc, domain, out, out / "train_log.jsonl")
    _restore(accelerator, out, start, training.log_path)
    batches = _batches(dataset, tc, start, accelerator)

    t0 = time.perf_counter()
    last = _train_loop(training, start, batches, t0, progress, console)
    if start >= tc.steps and training.main:
        prior_model.save_prior(prior, out)
    seconds = time.perf_counter() - t0
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainReport(out=out, steps=tc.steps, start_step=start, final_loss=last, seconds=seconds,
                       trainable_parameters=sum(p.numel() for p in params), samples=len(dataset))
