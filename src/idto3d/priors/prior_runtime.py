"""Apply a ``RuntimeConfig`` to a prior: device, precision, memory format, attention kernels, ``torch.compile``.

Each option keeps the prior's outputs those of the fp32 / contiguous / SDPA / eager reference within the
tolerance the tests state (exact up to float rounding for layout and kernels; a few percent for half
precision). The prior's inputs and outputs stay fp32 whatever its dtype (``Prior.autocast``); 3-D fields are not
the prior's and are never touched here.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch

from idto3d.core.config import RuntimeConfig
from idto3d.core.errors import IdtoError
from idto3d.priors import adapters as ad
from idto3d.core.device import dtype_name, resolve_device, resolve_dtype


def _cpp_compiler() -> str | None:
    # Inductor's CPU backend builds C++ kernels; it honours $CXX, else looks for the usual compilers.
    return os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)


def _check(cfg: RuntimeConfig, device: torch.device) -> torch.dtype:
    """Validate everything first, so a bad option leaves the prior as it was."""
    dtype = resolve_dtype(cfg.precision, device)
    if cfg.attention not in ad.ATTENTION_MODES:
        raise IdtoError(f"unknown runtime.attention {cfg.attention!r}; choose one of: {', '.join(ad.ATTENTION_MODES)}")
    if cfg.compile:
        if not hasattr(torch.nn.Module, "compile"):
            raise IdtoError(f"runtime.compile needs torch >= 2.2 (this is {torch.__version__}); set runtime.compile"
                            f"=false")
        if device.type == "cpu" and _cpp_compiler() is None:
            raise IdtoError("runtime.compile on cpu needs a C++ compiler (g++ or clang++, or $CXX) for torch's "
                            "inductor; install one or set runtime.compile=false")
    return dtype


def _set_vae_attention(vae: Any, mode: str) -> str:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    proc = AttnProcessor() if mode == "math" else AttnProcessor2_0()
    if getattr(vae, "attn_processors", None):
        vae.set_attn_processor(proc)
    return type(proc).__name__


def _set_text_attention(text_encoder: Any, mode: str) -> str | None:
    # transformers' own switch; older releases lack it, and then the text encoder keeps what it loaded with
    # (it runs once per prompt, outside the SDS loop).
    impl = "eager" if mode == "math" else "sdpa"
    setter = getattr(text_encoder, "set_attn_implementation", None)
    if setter is None:
        return getattr(getattr(text_encoder, "config", None), "_attn_implementation", None)
    setter(impl)
    return impl


def _set_compiled(unet: torch.nn.Module, on: bool) -> None:
    # nn.Module.compile compiles the module's call in place: ``prior.unet`` stays the diffusers model (config,
    # attn_processors, state_dict, hooks), only its calls run the compiled graph. Turning it off again
    # clears what compile() set.
    compiled = getattr(unet, "_compiled_call_impl", None) is not None
    if on and not compiled:
        unet.compile()
    elif not on and compiled:
        unet._compiled_call_impl = None


def configure_prior(prior: Any, runtime_cfg: RuntimeConfig | None = None,
                    device: str | torch.device | None = None) -> Any:
    """Apply ``runtime_cfg`` to ``prior`` in place and return it; ``device`` overrides ``runtime_cfg.device``.

    UNet, VAE, text encoder, adapters and projections move to the device and the resolved dtype; the UNet and
    VAE take channels-last (or contiguous) weights; every attention of the prior (adapter processors, the VAE's
    own, the text encoder's) takes the SDPA or math kernel; ``compile`` compiles the UNet's calls. What was
    applied is recorded in ``prior.runtime``.
    """
    cfg = runtime_cfg or RuntimeConfig()
    dev = resolve_device(cfg.device) if device is None else (
        resolve_device(device) if isinstance(device, str) else torch.device(device))
    dtype = _check(cfg, dev)

    prior.to(device=dev, dtype=dtype)  # every submodule: UNet (with its adapter processors), VAE, text, projections
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    for module in (prior.unet, prior.vae):
        module.to(memory_format=fmt)
    ad.set_attention_mode(prior.unet, cfg.attention)
    vae_attention = _set_vae_attention(prior.vae, cfg.attention)
    text_attention = _set_text_attention(prior.text_encoder, cfg.attention)
    _set_compiled(prior.unet, cfg.compile)
    prior.runtime = {"device": str(dev), "precision": dtype_name(dtype), "requested_precision": cfg.precision,
                     "autocast": dtype != torch.float32, "channels_last": bool(cfg.channels_last),
                     "attention": cfg.attention, "vae_attention": vae_attention, "text_attention": text_attention,
                     "compile": bool(cfg.compile)}
    return prior


def runtime_summary(prior: Any) -> str:
    """One line for logs and bench tables: ``cpu fp32 sdpa`` plus the options that are on."""
    rt = prior.runtime or {"device": str(prior.device), "precision": dtype_name(prior.dtype), "attention": "sdpa"}
    parts = [rt["device"], rt["precision"] + (" autocast" if rt.get("autocast") else ""), rt["attention"]]
    parts += [k.replace("_", "-") for k in ("channels_last", "compile") if rt.get(k)]
    return " ".join(parts)
