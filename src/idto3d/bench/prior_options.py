"""``idto3d bench runtime``: the prior's runtime options (``RuntimeConfig``), each timed against fp32 + SDPA.

One case per prior size: one SDS guidance call and its backward to the renders, as a stage runs it (VAE encode
of one render with grad, classifier-free guidance as one UNet batch of 2, the SDS loss, backward through the
VAE encoder to the fp32 render). Variants: ``fp32`` (SDPA, contiguous, eager: the baseline), ``bf16`` and
``fp16`` (weights in half precision, forward passes under autocast), ``channels_last``, ``math`` (explicit
softmax(QK^T)V instead of SDPA) and ``compile`` (``torch.compile`` of the UNet); ``+`` joins options into one
variant (``bf16+channels_last``). Each variant gets a fresh prior from the same seed, so no variant inherits
another's rounded weights or compiled code.

Times: a first call (untimed warm-up for the others; for ``compile`` it is reported, as it holds the
compilation), then the median of ``repeats`` calls. Peak memory: CUDA ``max_memory_allocated``; CPU the peak
resident set (Linux ``VmHWM``, reset before each variant; it includes the prior's weights), else the process's
max RSS, which never goes down. Sizes: the tiny prior at its own resolution (64 px renders, 8x8 latents) and,
with ``full_size``, the SD1.5 architecture with random weights at the paper's setting (512 px renders, 64x64
latents).
"""

from __future__ import annotations

import gc
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from idto3d.core.config import GuidanceConfig, RuntimeConfig
from idto3d.core.errors import IdtoError
from idto3d.bench.steps import sync
from idto3d.core.device import resolve_device

# Each option token and the RuntimeConfig fields it sets.
OPTIONS: dict[str, dict[str, Any]] = {
    "fp32": {"precision": "fp32"}, "bf16": {"precision": "bf16"}, "fp16": {"precision": "fp16"},
    "channels_last": {"channels_last": True}, "math": {"attention": "math"}, "sdpa": {"attention": "sdpa"},
    "compile": {"compile": True},
}
DEFAULT_VARIANTS = ("fp32", "bf16", "fp16", "channels_last", "math", "compile")
BASELINE = "fp32"
_PROMPT = "A front view normal map face portrait of a young woman on a white background"


def parse_variants(variants: str | Sequence[str] | None) -> list[str]:
    """``"bf16,math"`` or a list -> variant names, the baseline first; unknown options are an ``IdtoError``."""
    if variants is None:
        names = list(DEFAULT_VARIANTS)
    else:
        names = [v.strip() for v in (variants.split(",") if isinstance(variants, str) else variants) if v.strip()]
    for name in names:
        bad = [tok for tok in name.split("+") if tok not in OPTIONS]
        if bad:
            raise IdtoError(f"unknown runtime variant option {bad[0]!r} in {name!r}; options: {', '.join(OPTIONS)} "
                            f"(join several with +, e.g. bf16+channels_last)")
    return [BASELINE] + [n for n in dict.fromkeys(names) if n != BASELINE]


def variant_config(name: str) -> RuntimeConfig:
    """The ``RuntimeConfig`` of a variant name (unset options keep the fp32 / SDPA / eager reference)."""
    fields: dict[str, Any] = {"precision": "fp32"}
    for tok in name.split("+"):
        fields.update(OPTIONS[tok])
    return RuntimeConfig(**fields)


# ---- memory -----------------------------------------------------------------------------------------------

def _reset_peak(device: torch.device) -> bool:
    """Start a fresh peak for ``device``; False when only the process-wide max RSS can be read."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return True
    if device.type == "cpu" and sys.platform.startswith("linux"):
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            return True
        except OSError:
            return False
    return False


def _peak_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "cpu":
        if sys.platform.startswith("linux"):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
    return None


# ---- one variant ------------------------------------------------------------------------------------------

def _time_call(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1000.0


def _measure(prior: Any, gcfg: GuidanceConfig, resolution: int, repeats: int, device: torch.device,
             cache_dir: Path) -> dict[str, Any]:
    """First-call and median ms of one SDS call + backward to a fp32 render, and the peak memory."""
    from idto3d.priors.guidance import GuidanceCond, SDSGuidance

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, resolution, resolution, generator=gen).to(device).requires_grad_()
    id_embedding = torch.nn.functional.normalize(torch.randn(prior.spec.id_dim, generator=gen), dim=0)
    cond = GuidanceCond(prompts=[_PROMPT], id_embedding=id_embedding.to(device), expressions=["smile"])
    # A run memoises prompt and expression embeddings in its first step: outside every timed call here.
    prior.encode_text([_PROMPT, ""])
    prior.expression_table(cache_dir)
    guidance = SDSGuidance(prior, gcfg, "geometry", 1000, seed=0)
    steps = iter(range(10**9))

    def call() -> None:
        images.grad = None
        guidance(images, cond, next(steps)).loss.backward()

    exact_peak = _reset_peak(device)
    first = _time_call(call, device)
    times = [_time_call(call, device) for _ in range(repeats)]
    if images.grad is None or images.grad.dtype != torch.float32:
        raise RuntimeError("the SDS gradient did not reach the fp32 render")  # a broken option, not the user's
    return {"first_ms": first, "ms": statistics.median(times), "min_ms": min(times), "peak_mib": _peak_mib(device),
            "peak_kind": "peak RSS" if device.type == "cpu" and exact_peak else
                         "max allocated" if device.type == "cuda" else "process max RSS"}


def _run_size(label: Callable[[Any], str], make: Callable[[], Any], gcfg: GuidanceConfig, resolution: int,
              names: list[str], repeats: int, device: torch.device, cache_dir: Path) -> list[dict]:
    from idto3d.priors.prior_runtime import configure_prior, runtime_summary

    stage = f"prior runtime ({device.type})"
    rows, base, case = [], None, None
    for name in names:
        prior = configure_prior(make(), variant_config(name), device)
        case = case or f"{label(prior)}, SDS+bwd @{resolution}px, latents {gcfg.latent_size}^2"
        m = _measure(prior, gcfg, resolution, repeats, device, cache_dir)
        applied, summary = dict(prior.runtime), runtime_summary(prior)
        del prior
        gc.collect()
        base = base or m["ms"]
        peak = "" if m["peak_mib"] is None else f", {m['peak_kind']} {m['peak_mib']:.0f} MiB"
        common = {"stage": stage, "case": case, "baseline": f"{BASELINE} (same run)", "runtime": applied,
                  "first_call_ms": m["first_ms"], "min_ms": m["min_ms"], "peak_mib": m["peak_mib"], "repeats": repeats}
        rows.append({**common, "backend": f"{name} ({summary}{peak})", "ms": m["ms"], "ratio": m["ms"] / base})
        if "compile" in name.split("+"):
            rows.append({**common, "backend": f"{name}: first call (compiles)", "ms": m["first_ms"],
                         "ratio": m["first_ms"] / base})
    return rows


def bench_runtime(device: str = "cpu", full_size: bool = False, repeats: int | None = None,
                  variants: str | Sequence[str] | None = None) -> list[dict]:
    """Rows in ``render_table``'s format: per prior size and variant, ms per SDS call + backward (median of
    ``repeats``; default 1 for the full-size prior on CPU, else 10) and its ratio to fp32 in the same run."""
    from idto3d.bench.pipeline import _full_size_prior, _params_m
    from idto3d.priors.prior import build_prior
    from idto3d.priors.tiny import make_tiny_base_model

    dev = resolve_device(device)
    names = parse_variants(variants)
    if repeats is not None and repeats < 1:
        raise IdtoError("--repeats must be > 0")
    torch.manual_seed(0)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="idto3d-bench-") as tmp:
        base = make_tiny_base_model(Path(tmp) / "sd", seed=0)
        tiny = lambda: build_prior(base, "normal", 512, seed=0)  # noqa: E731
        probe = tiny()
        size = int(probe.unet.config.sample_size)
        rows += _run_size(lambda p: f"tiny prior ({_params_m(p):.1f}M)", tiny,
                          GuidanceConfig(latent_mode="vae", latent_size=size), size * probe.vae_scale_factor,
                          names, repeats or 10, dev, Path(tmp) / "expressions")
        if full_size:
            # The paper's setting: 64x64 VAE latents of 512 px renders. Built on the CPU, then moved (and cast)
            # by configure_prior, as a loaded prior would be.
            full = lambda: _full_size_prior(probe, torch.device("cpu"))  # noqa: E731
            n = repeats or (1 if dev.type == "cpu" else 10)
            rows += _run_size(lambda p: f"full-size SD1.5 prior ({_params_m(p):.0f}M, random weights)", full,
                              GuidanceConfig(latent_mode="vae", latent_size=64), 512, names, n, dev,
                              Path(tmp) / "expressions")
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine()}
    for r in rows:
        r.update(meta)
    return rows
