"""IP-Adapter FaceID checkpoints: which kind a state dict is, and FaceID's own LoRA.

Kinds are told apart as diffusers' ``_convert_ip_adapter_image_proj_to_diffusers`` does, in its order:
``perceiver_resampler.proj_in.weight`` in ``image_proj`` = FaceID Plus (Plus and Plus v2 share one layout; v2
only switches the projection's shortcut on at inference, so the file name tells them apart), then
``norm.weight`` = FaceID (an MLP projection of the ArcFace embedding). A Plus checkpoint also holds
``proj.0``/``norm``, which is why the order matters. A Plus projection is diffusers'
``IPAdapterFaceIDPlusImageProjection`` (its weights renamed by diffusers' own converter); it reads CLIP image
features of the face (``identity.clip_face``) besides the ArcFace embedding.

FaceID's checkpoints carry a rank-128 LoRA on Q, K, V and out of every attention layer (``N.to_q_lora.down`` /
``.up`` ..., N in ``unet.attn_processors`` order), trained together with the ID K/V: IP-Adapter adds
``up(down(x))`` at scale 1 to each projection. ``lora_deltas`` reads it, ``fuse_lora`` adds ``up @ down`` into
the frozen base weights (exact for linear layers: the base's own bias is kept).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from idto3d.core.errors import IdtoError

FACEID, FACEID_PLUS, FACEID_PLUS_V2, OTHER = "faceid", "faceid_plus", "faceid_plus_v2", "other"
PLUS_KINDS = (FACEID_PLUS, FACEID_PLUS_V2)
# IP-Adapter's LoRA name -> the diffusers Attention submodule it adds to
LORA_TARGETS = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}


def checkpoint_kind(image_proj: Mapping[str, torch.Tensor], filename: str = "") -> str:
    """``faceid``, ``faceid_plus``, ``faceid_plus_v2`` or ``other`` (diffusers' detection order)."""
    if "perceiver_resampler.proj_in.weight" in image_proj:
        return FACEID_PLUS_V2 if "plusv2" in Path(filename).name.lower().replace("_", "").replace("-", "") \
            else FACEID_PLUS
    if "norm.weight" in image_proj and "proj.0.weight" in image_proj:
        return FACEID
    return OTHER


def plus_spec(image_proj: Mapping[str, torch.Tensor], kind: str, image_encoder: str) -> dict:
    """``PriorSpec.id_projection`` of a Plus checkpoint: the sizes diffusers' converter reads from its weights
    (depth 4 and 4 tokens are what every published Plus checkpoint and diffusers assume), the v2 shortcut, and
    the CLIP image encoder whose features it reads."""
    proj_in = image_proj["perceiver_resampler.proj_in.weight"]
    depth = len({k.split(".")[2] for k in image_proj if k.startswith("perceiver_resampler.layers.")})
    return {"kind": kind, "embed_dims": int(proj_in.shape[0]), "hidden_dims": int(proj_in.shape[1]),
            "heads": int(image_proj["perceiver_resampler.layers.0.0.to_q.weight"].shape[0]) // 64, "depth": depth,
            "num_tokens": int(image_proj["proj.2.weight"].shape[0]) // int(proj_in.shape[0]),
            "shortcut": kind == FACEID_PLUS_V2, "shortcut_scale": 1.0, "image_encoder": image_encoder}


def lora_deltas(unet: nn.Module, ip_adapter: Mapping[str, torch.Tensor], source: str
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"<attention module>.<to_q|to_k|to_v|to_out.0>": (down [r, in], up [out, r])}`` of every LoRA in the
    checkpoint, checked against ``unet``'s layers (empty when the checkpoint has none)."""
    names = list(unet.attn_processors)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, down in ip_adapter.items():
        index, _, rest = key.partition(".")
        lora, _, tail = rest.partition(".")
        if lora not in LORA_TARGETS or tail != "down.weight":
            continue
        up = ip_adapter.get(f"{index}.{lora}.up.weight")
        if up is None or not index.isdigit() or int(index) >= len(names):
            raise IdtoError(f"{source}: LoRA weight '{key}' has no matching up-projection or attention layer")
        module = names[int(index)].removesuffix(".processor")
        target = unet.get_submodule(f"{module}.{LORA_TARGETS[lora]}")
        if tuple(down.shape) != (up.shape[1], target.in_features) or up.shape[0] != target.out_features:
            raise IdtoError(f"{source}: LoRA '{key}' ({tuple(down.shape)} x {tuple(up.shape)}) does not fit "
                            f"{module}.{LORA_TARGETS[lora]} ({target.out_features} x {target.in_features})")
        out[f"{module}.{LORA_TARGETS[lora]}"] = (down, up)
    return out


@torch.no_grad()
def fuse_lora(unet: nn.Module, deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scale: float = 1.0) -> int:
    """``W += scale * up @ down`` for each target linear layer of ``unet`` (computed in fp32); returns the count."""
    for name, (down, up) in deltas.items():
        linear = unet.get_submodule(name)
        delta = up.float() @ down.float()
        linear.weight.copy_((linear.weight.float() + scale * delta.to(linear.weight.device)).to(linear.weight.dtype))
    return len(deltas)


def lora_state(deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Flat tensors for a prior folder's ``base_lora.safetensors``."""
    out = {}
    for name, (down, up) in deltas.items():
        out[f"{name}.down"] = down.detach().float().contiguous().cpu()
        out[f"{name}.up"] = up.detach().float().contiguous().cpu()
    return out


def deltas_from_state(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    names = sorted({k.rsplit(".", 1)[0] for k in state})
    return {n: (state[f"{n}.down"], state[f"{n}.up"]) for n in names}
