"""Where the SDS stages run: the device and the priors' dtype a ``RuntimeConfig`` asks for, checked against
this machine (an unavailable device is an error naming what is there, not a silent fall-back)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.utils.deterministic

from idto3d.core.errors import IdtoError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``/``cpu``/``cuda``/``cuda:N``/``mps`` as a ``torch.device``; one this machine lacks is an
    ``IdtoError``. ``auto`` is CUDA when present, else the CPU (MPS only when asked: some ops fall back)."""
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise IdtoError(f"device {name}: no CUDA device here (torch {torch.__version__}); use cpu")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise IdtoError(f"device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return dev
    if name == "mps":
        if not _mps_available():
            raise IdtoError("device mps: Apple's Metal backend is not available on this machine; use cpu")
        return torch.device("mps")
    raise IdtoError(f"unknown device {name!r}; choose one of: auto, cpu, cuda, cuda:N, mps")


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The priors' dtype. ``auto``: bf16 on CUDA GPUs that support it (no fp16 overflow, so no NaN steps to
    skip), fp16 on older GPUs, fp32 elsewhere (half-precision matmuls on CPU are slow or emulated)."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if precision not in DTYPES:
        raise IdtoError(f"unknown precision {precision!r}; choose one of: auto, {', '.join(DTYPES)}")
    return DTYPES[precision]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))


def rasterizer_name(backend: str, fast_paths: bool) -> str:
    """``render.backend`` as the stages use it: ``auto`` means nvdiffrast only when fast paths are on."""
    return backend if backend != "auto" else ("auto" if fast_paths else "torch")


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` on ``device`` without making the host wait for the GPU: a plain ``.to('cuda')`` of a host tensor
    synchronises the stream (it must not return before pageable memory is read), so the copy goes through
    pinned memory, asynchronously. Host-drawn randomness (cameras, noise) reaches the GPU this way every step."""
    device = torch.device(device)
    if x.device == device:
        return x
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


@contextmanager
def reproducible_kernels(device: torch.device | str) -> Iterator[None]:
    """On the CPU, torch's deterministic kernels while the block runs; elsewhere nothing changes.

    Why: the backward of tensor indexing (``x[idx]``, everywhere a mesh gathers its vertices) accumulates with
    ``index_put_``, which on the CPU, from 32768 elements up and with more than one thread, adds floats
    atomically from every thread: the sum's last bits follow thread timing, and an SDS run at grid 48 drifts
    from the 17th iteration on. The deterministic kernel sorts the indices and adds in order (the same bits as
    one thread). Uninitialised memory stays unfilled (nothing here reads it; filling costs every allocation).
    Not on CUDA: there some kernels have no deterministic version and cuBLAS needs its workspace configured."""
    if torch.device(device).type != "cpu":
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = before[2]
