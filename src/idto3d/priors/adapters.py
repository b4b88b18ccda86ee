"""The prior's adapters, as diffusers attention processors (paper eqs. 3 and 4).

- ``LoRASelfAttnProcessor`` (every ``attn1``): Q, K and V each get a rank-16 LoRA: the prior's domain
  (normal or albedo) lives in these weights; one prior = one domain = one set (eq. 3).
- ``DecoupledCrossAttnProcessor`` (every ``attn2``): rank-32 LoRA on the text branch's Q, K, V, plus the
  IP-Adapter branches ``lambda_id * Att(Q, K_id, V_id) + lambda_exp * Att(Q, K_exp, V_exp)`` (eq. 4).
  ID and expression K/V start as copies of the text K/V (as IP-Adapter's training does), so a fresh branch
  already attends sensibly; ``lambda = 0`` (or no tokens) skips a branch, giving the un-adapted output exactly.

ID and expression tokens (made by the projections in ``model.Prior``) and per-call lambdas reach the
processors through ``cross_attention_kwargs``; lambdas may be per-sample tensors ``[B]``, so one batched
UNet call can hold the conditional and the unconditional half of classifier-free guidance.

Parameter count (``adapter_parameter_breakdown``; checked against the analytic formula in the tests). For
SD1.5 (16 self- and 16 cross-attention layers whose widths sum to 12480, cross-attention dim 768) with
512-D ArcFace IDs and 768-D CLIP expression embeddings, the adapters hold 47.96M parameters: 5.3% of UNet +
adapters (859.5M + 48.0M). Of these, self-attn LoRA 1.20M (0.13%), cross-attn LoRA 2.38M (0.26%), ID K/V
19.17M (2.1%), expression K/V 19.17M (2.1%), ID projection 3.68M (0.41%), expression projection 2.36M
(0.26%). The paper's "about 0.2%" matches the LoRA weights alone (0.39%; self-attention LoRA 0.13%), not the
ID and expression K/V: at full width, as IP-Adapter defines them, each pair alone is 2.1% of SD1.5
(IP-Adapter itself is 22M). We keep the paper's architecture and report the count it gives rather than
shrinking branches to hit the number.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from idto3d.core.errors import IdtoError

Lambda = float | torch.Tensor | None


class LoRALinear(nn.Module):
    """``x -> up(down(x))`` with ``up`` zero-initialised, so a fresh LoRA changes nothing (diffusers' and
    IP-Adapter-FaceID's ``down``/``up`` layout)."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype))).to(x.dtype)


def _flatten_input(attn: Any, hidden_states: torch.Tensor, temb: torch.Tensor | None) -> tuple:
    """The shared preamble of diffusers' ``AttnProcessor2_0``: spatial norm, [B,C,H,W] -> [B,HW,C], group norm."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape = hidden_states.shape
    if hidden_states.ndim == 4:
        b, c, h, w = shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, residual, shape


def _heads(attn: Any, x: torch.Tensor, batch: int) -> torch.Tensor:
    return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)


ATTENTION_MODES = ("sdpa", "math")


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + mask) V written out: the reference for SDPA's fused kernels. The softmax
    runs in fp32 (as diffusers' ``upcast_softmax``), so half-precision logits cannot overflow it."""
    scores = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


def _attend(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            mask: torch.Tensor | None = None, mode: str = "sdpa") -> torch.Tensor:
    """Multi-head attention of already projected q [B,N,C], k/v [B,M,C] -> [B,N,C]; ``mode`` is ``sdpa``
    (torch's fused kernels: flash / memory-efficient where the device has them) or ``math``."""
    b = q.shape[0]
    qh, kh, vh = _heads(attn, q, b), _heads(attn, k, b), _heads(attn, v, b)
    if attn.norm_q is not None:
        qh = attn.norm_q(qh)
    if attn.norm_k is not None:
        kh = attn.norm_k(kh)
    if mode == "math":
        out = _math_attention(qh, kh, vh, mask)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, -1, attn.heads * (q.shape[-1] // attn.heads)).to(q.dtype)


def _prepare_mask(attn: Any, mask: torch.Tensor | None, seq_len: int, batch: int) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = attn.prepare_attention_mask(mask, seq_len, batch)
    return mask.view(batch, attn.heads, -1, mask.shape[-1])


def _lora_qkv(attn: Any, lora: nn.Module, x: torch.Tensor, ctx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Q from the image features, K and V from the context, each plus its LoRA delta."""
    return (attn.to_q(x) + lora.to_q_lora(x), attn.to_k(ctx) + lora.to_k_lora(ctx),
            attn.to_v(ctx) + lora.to_v_lora(ctx))


def _finish(attn: Any, out: torch.Tensor, residual: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    out = attn.to_out[1](attn.to_out[0](out))
    if len(shape) == 4:
        out = out.transpose(-1, -2).reshape(shape)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def _weighted(lam: Lambda, x: torch.Tensor) -> torch.Tensor:
    if isinstance(lam, torch.Tensor):
        return lam.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1))) * x
    return lam * x


def _is_off(lam: Lambda, tokens: torch.Tensor | None) -> bool:
    if tokens is None or lam is None:
        return True
    if isinstance(lam, torch.Tensor):
        # Reading a device tensor would make the host wait for the GPU in every layer: only host tensors are
        # checked (a branch whose device lambdas are all zero is computed, then weighted by zero). Under
        # torch.compile neither is: a read would split the graph in every cross-attention layer.
        return lam.device.type == "cpu" and not torch.compiler.is_compiling() and bool((lam == 0).all())
    return lam == 0


class LoRASelfAttnProcessor(nn.Module):
    """Self-attention with LoRA on Q, K, V (eq. 3): ``Q^n = X W_Q + X W_Q^n`` and likewise K, V."""

    def __init__(self, query_dim: int, inner_dim: int, rank: int) -> None:
        super().__init__()
        self.to_q_lora = LoRALinear(query_dim, inner_dim, rank)
        self.to_k_lora = LoRALinear(query_dim, inner_dim, rank)
        self.to_v_lora = LoRALinear(query_dim, inner_dim, rank)
        self.attention = "sdpa"  # or "math": see _attend

    # The ID/expression keywords are accepted (and unused) so one cross_attention_kwargs dict serves every
    # layer without diffusers warning about unexpected arguments.
    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 id_tokens: torch.Tensor | None = None, exp_tokens: torch.Tensor | None = None,
                 lambda_id: Lambda = None, lambda_exp: Lambda = None) -> torch.Tensor:
        x, residual, shape = _flatten_input(attn, hidden_states, temb)
        ctx = x if encoder_hidden_states is None else encoder_hidden_states
        mask = _prepare_mask(attn, attention_mask, ctx.shape[1], x.shape[0])
        q, k, v = _lora_qkv(attn, self, x, ctx)
        return _finish(attn, _attend(attn, q, k, v, mask, self.attention), residual, shape)


class DecoupledCrossAttnProcessor(nn.Module):
    """Text cross-attention with LoRA on Q, K, V, plus decoupled ID and expression attention (eq. 4).

    ``to_k_id``/``to_v_id`` are IP-Adapter's ``to_k_ip``/``to_v_ip`` (a FaceID checkpoint loads into them).
    ``lambda_id``/``lambda_exp`` here are the defaults; a call's ``cross_attention_kwargs`` override them.
    """

    def __init__(self, query_dim: int, cross_dim: int, inner_dim: int, rank: int,
                 lambda_id: float = 1.0, lambda_exp: float = 1.0) -> None:
        super().__init__()
        self.to_q_lora = LoRALinear(query_dim, inner_dim, rank)
        self.to_k_lora = LoRALinear(cross_dim, inner_dim, rank)
        self.to_v_lora = LoRALinear(cross_dim, inner_dim, rank)
        self.to_k_id = nn.Linear(cross_dim, inner_dim, bias=False)
        self.to_v_id = nn.Linear(cross_dim, inner_dim, bias=False)
        self.to_k_exp = nn.Linear(cross_dim, inner_dim, bias=False)
        self.to_v_exp = nn.Linear(cross_dim, inner_dim, bias=False)
        self.lambda_id = lambda_id
        self.lambda_exp = lambda_exp
        self.attention = "sdpa"  # or "math": see _attend

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 id_tokens: torch.Tensor | None = None, exp_tokens: torch.Tensor | None = None,
                 lambda_id: Lambda = None, lambda_exp: Lambda = None) -> torch.Tensor:
        x, residual, shape = _flatten_input(attn, hidden_states, temb)
        ctx = x if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        mask = _prepare_mask(attn, attention_mask, ctx.shape[1], x.shape[0])
        q, k, v = _lora_qkv(attn, self, x, ctx)
        mode = self.attention
        out = _attend(attn, q, k, v, mask, mode)
        lam_id = self.lambda_id if lambda_id is None else lambda_id
        lam_exp = self.lambda_exp if lambda_exp is None else lambda_exp
        if not _is_off(lam_id, id_tokens):
            tok = id_tokens.to(q.dtype)
            out = out + _weighted(lam_id, _attend(attn, q, self.to_k_id(tok), self.to_v_id(tok), mode=mode))
        if not _is_off(lam_exp, exp_tokens):
            tok = exp_tokens.to(q.dtype)
            out = out + _weighted(lam_exp, _attend(attn, q, self.to_k_exp(tok), self.to_v_exp(tok), mode=mode))
        return _finish(attn, out, residual, shape)


AdapterProcessor = LoRASelfAttnProcessor | DecoupledCrossAttnProcessor


def _attention_module(unet: nn.Module, processor_name: str) -> Any:
    return unet.get_submodule(processor_name.removesuffix(".processor"))


def install_adapters(unet: nn.Module, self_attn_rank: int, cross_attn_rank: int) -> dict[str, AdapterProcessor]:
    """Replace every attention processor of ``unet`` with an adapter processor (in ``attn_processors`` order).

    New ID/expression K/V copy the layer's text K/V weights. Returns the processors by name.
    """
    procs: dict[str, AdapterProcessor] = {}
    ref = next(unet.parameters())
    for name in unet.attn_processors:
        attn = _attention_module(unet, name)
        query_dim, inner = attn.to_q.in_features, attn.to_q.out_features
        if attn.is_cross_attention:
            proc: AdapterProcessor = DecoupledCrossAttnProcessor(query_dim, attn.to_k.in_features, inner,
                                                                 cross_attn_rank)
            with torch.no_grad():
                for dst in (proc.to_k_id, proc.to_k_exp):
                    dst.weight.copy_(attn.to_k.weight)
                for dst in (proc.to_v_id, proc.to_v_exp):
                    dst.weight.copy_(attn.to_v.weight)
        else:
            proc = LoRASelfAttnProcessor(query_dim, inner, self_attn_rank)
        procs[name] = proc.to(device=ref.device, dtype=ref.dtype)
    unet.set_attn_processor(dict(procs))
    return procs


def adapter_processors(unet: nn.Module) -> dict[str, AdapterProcessor]:
    procs = {k: p for k, p in unet.attn_processors.items() if isinstance(p, (LoRASelfAttnProcessor,
                                                                            DecoupledCrossAttnProcessor))}
    if not procs:
        raise ValueError("this UNet has no idto3d adapter processors; call install_adapters first")
    return procs


def set_adapter_scales(unet: nn.Module, lambda_id: float | None = None, lambda_exp: float | None = None) -> None:
    for p in adapter_processors(unet).values():
        if isinstance(p, DecoupledCrossAttnProcessor):
            if lambda_id is not None:
                p.lambda_id = float(lambda_id)
            if lambda_exp is not None:
                p.lambda_exp = float(lambda_exp)


def set_attention_mode(unet: nn.Module, mode: str) -> None:
    """``sdpa`` or ``math`` on every adapter processor of ``unet``."""
    if mode not in ATTENTION_MODES:
        raise IdtoError(f"unknown attention mode {mode!r}; choose one of: {', '.join(ATTENTION_MODES)}")
    for p in adapter_processors(unet).values():
        p.attention = mode


def _count(params: Any) -> int:
    return sum(p.numel() for p in params)


def adapter_parameter_breakdown(unet: nn.Module, id_proj: nn.Module | None = None,
                                exp_proj: nn.Module | None = None) -> dict[str, int | float]:
    """Adapter parameters by kind, the base UNet's own count and the trainable fraction of the whole."""
    procs = adapter_processors(unet).values()
    lora = lambda p: _count(q for n, q in p.named_parameters() if "_lora." in n)  # noqa: E731
    out: dict[str, int | float] = {
        "self_attn_lora": sum(lora(p) for p in procs if isinstance(p, LoRASelfAttnProcessor)),
        "cross_attn_lora": sum(lora(p) for p in procs if isinstance(p, DecoupledCrossAttnProcessor)),
        "id_kv": sum(_count([p.to_k_id.weight, p.to_v_id.weight]) for p in procs
                     if isinstance(p, DecoupledCrossAttnProcessor)),
        "exp_kv": sum(_count([p.to_k_exp.weight, p.to_v_exp.weight]) for p in procs
                      if isinstance(p, DecoupledCrossAttnProcessor)),
        "id_proj": _count(id_proj.parameters()) if id_proj is not None else 0,
        "exp_proj": _count(exp_proj.parameters()) if exp_proj is not None else 0,
    }
    adapters = sum(int(v) for v in out.values())
    in_procs = {id(q) for p in procs for q in p.parameters()}
    base = _count(q for q in unet.parameters() if id(q) not in in_procs)
    out.update(adapters=adapters, base_unet=base, fraction=adapters / (base + adapters))
    return out


# ---- IP-Adapter FaceID checkpoints -------------------------------------------------------------------

def read_faceid_checkpoint(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj": ..., "ip_adapter": ...}`` from an ``ip-adapter-faceid_sd15`` ``.bin`` or ``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise IdtoError(f"IP-Adapter checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        flat = load_file(path)
        sd: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        for key, value in flat.items():
            head, _, rest = key.partition(".")
            if head in sd:
                sd[head][rest] = value
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle/zip errors have many types; the message is what matters
            raise IdtoError(f"cannot read IP-Adapter checkpoint {path}: {exc}") from None
    if not isinstance(sd, Mapping) or not sd.get("image_proj") or not sd.get("ip_adapter"):
        raise IdtoError(f"{path} is not an IP-Adapter checkpoint: expected 'image_proj' and 'ip_adapter' "
                        f"weights (keys prefixed 'image_proj.'/'ip_adapter.' in a .safetensors file)")
    return {"image_proj": dict(sd["image_proj"]), "ip_adapter": dict(sd["ip_adapter"])}


def load_faceid_state(unet: nn.Module, id_proj: nn.Module, state: Mapping[str, Mapping[str, torch.Tensor]],
                      source: str = "checkpoint") -> dict[str, int]:
    """Copy an IP-Adapter-FaceID state into the ID branch: ``image_proj`` -> ``id_proj``, ``N.to_k_ip`` /
    ``N.to_v_ip`` -> ID K/V of the N-th processor in ``unet.attn_processors`` order (diffusers' numbering).

    The checkpoint's own LoRA (``N.to_*_lora``, rank 128 on every layer, trained on photos) is ignored:
    our LoRA is the domain adapter, trained per prior. Returns counts of loaded and ignored tensors.
    """
    from idto3d.priors.faceid import OTHER, PLUS_KINDS, checkpoint_kind

    proj = state["image_proj"]
    kind = checkpoint_kind(proj, source)
    if kind == OTHER:
        raise IdtoError(f"{source}: a non-FaceID IP-Adapter checkpoint (CLIP image features); only "
                        f"ip-adapter-faceid checkpoints (projections of the ArcFace embedding) fit the ID branch")
    ours = (id_proj.proj if kind in PLUS_KINDS else id_proj.ff).net[0].proj.weight.shape
    theirs = tuple(proj["proj.0.weight"].shape)
    if theirs[1] != ours[1]:
        raise IdtoError(f"{source}: its ID projection takes {theirs[1]}-D identity embeddings but this prior's "
                        f"takes {ours[1]}-D; build the prior with id_dim={theirs[1]} (an ArcFace identity)")
    if kind in PLUS_KINDS:  # the perceiver's names, renamed by diffusers' own converter
        renamed = unet._convert_ip_adapter_image_proj_to_diffusers(dict(proj), low_cpu_mem_usage=False).state_dict()
    else:
        renamed = {k.replace("proj.0", "ff.net.0.proj").replace("proj.2", "ff.net.2"): v for k, v in proj.items()}
    _load_exact(id_proj, renamed, f"{source} image_proj")

    ip = state["ip_adapter"]
    loaded = len(renamed)
    for index, (name, proc) in enumerate(unet.attn_processors.items()):
        if not isinstance(proc, DecoupledCrossAttnProcessor):
            continue
        keys = (f"{index}.to_k_ip.weight", f"{index}.to_v_ip.weight")
        missing = [k for k in keys if k not in ip]
        if missing:
            raise IdtoError(f"{source}: no '{missing[0]}' for attention layer {name}: the checkpoint was made "
                            f"for a UNet with a different layout")
        _load_exact(proc, {"to_k_id.weight": ip[keys[0]], "to_v_id.weight": ip[keys[1]]},
                    f"{source} ip_adapter[{index}]", strict=False)
        loaded += 2
    ignored = sum(1 for k in ip if "_lora." in k)
    return {"loaded": loaded, "ignored_lora": ignored}


def _load_exact(module: nn.Module, sd: Mapping[str, torch.Tensor], source: str, strict: bool = True) -> None:
    own = module.state_dict()
    for k, v in sd.items():
        if k not in own:
            raise IdtoError(f"{source}: unexpected weight '{k}'")
        if tuple(own[k].shape) != tuple(v.shape):
            raise IdtoError(f"{source}: weight '{k}' has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    if strict and set(own) != set(sd):
        raise IdtoError(f"{source}: missing weights {sorted(set(own) - set(sd))}")
    module.load_state_dict(dict(sd), strict=strict)
