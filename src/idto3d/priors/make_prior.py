"""``idto3d make-prior``: a prior folder from public weights, with no training.

The base model (a diffusers folder, or a hub id already in the Hugging Face cache) gets our adapters with
every branch that no checkpoint supplies switched off exactly: LoRA up-projections are zero (as always for
fresh adapters) and the ID and expression K/V are zero, so the attention of an empty branch adds nothing and
the prior predicts exactly what the base model predicts. An IP-Adapter FaceID checkpoint fills the ID branch
(projection + ID K/V) and, with ``fuse_lora``, FaceID's own LoRA is added into the frozen UNet. The folder
records the conventions the stages must follow (``priors.conventions``) and the recogniser the ID branch
expects, and loads with ``load_prior`` like a trained one (``generate``, ``evaluate``, ``train-prior --init``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from idto3d.core.errors import IdtoError
from idto3d.priors import adapters as ad
from idto3d.priors import conventions as conv
from idto3d.priors.recogniser import FACEID_RECOGNISER, record_of

MAKE_DOMAINS = ("normal", "albedo")


@dataclass
class MadePrior:
    out: Path
    base_model: str
    vae: str | None
    conventions: str
    id_dim: int
    ip_adapter: dict | None
    recogniser: dict | None
    adapters: int  # adapter parameters written


def _faceid_id_dim(path: Path) -> int:
    state = ad.read_faceid_checkpoint(path)
    weight = state["image_proj"].get("proj.0.weight")
    if weight is None:
        raise IdtoError(f"{path}: no 'image_proj.proj.0.weight': not an IP-Adapter FaceID checkpoint")
    return int(weight.shape[1])


def _checked_image_encoder(ref: str, ip_path: Path) -> str:
    """A CLIP vision model whose width is what the Plus checkpoint's perceiver reads; a local folder made
    absolute (recorded for generate)."""
    from transformers import CLIPVisionConfig

    from idto3d.priors.faceid import PLUS_KINDS, checkpoint_kind

    proj = ad.read_faceid_checkpoint(ip_path)["image_proj"]
    if checkpoint_kind(proj, ip_path.name) not in PLUS_KINDS:
        raise IdtoError(f"--image-encoder is for FaceID Plus checkpoints; {ip_path.name} is plain FaceID")
    if Path(ref).expanduser().is_dir():
        ref = str(Path(ref).expanduser().resolve())
    try:
        width = int(CLIPVisionConfig.from_pretrained(ref, local_files_only=True).hidden_size)
    except (OSError, ValueError) as exc:
        raise IdtoError(f"cannot read the CLIP image encoder {ref!r}: {str(exc).splitlines()[0]}") from None
    want = int(proj["perceiver_resampler.proj_in.weight"].shape[1])
    if width != want:
        raise IdtoError(f"image encoder {ref} gives {width}-wide features but {ip_path.name} reads {want}-wide ones "
                        f"(CLIP ViT-H-14: 1280)")
    return ref


@torch.no_grad()
def _silence_branches(prior: Any, keep_id: bool) -> None:
    """Zero K/V of the expression branch (and of the ID branch unless a checkpoint filled it)."""
    for proc in ad.adapter_processors(prior.unet).values():
        if isinstance(proc, ad.DecoupledCrossAttnProcessor):
            names = ("to_k_exp", "to_v_exp") + (() if keep_id else ("to_k_id", "to_v_id"))
            for name in names:
                getattr(proc, name).weight.zero_()


def make_prior(domain: str, base_model: str | Path, out: str | Path, *, vae: str | None = None,
               ip_adapter: str | Path | None = None, conventions: str | None = None, fuse_lora: bool = False,
               recogniser: str | Path | None = None, id_dim: int | None = None, adapter: Any = None,
               seed: int = 0, uncond_id: str | None = None, image_encoder: str | None = None) -> MadePrior:
    """Build and save a prior folder in ``out`` (see the module docstring); nothing is trained. ``uncond_id``
    overrides the conventions' unconditional ID branch (``off`` or ``zero``); ``image_encoder`` is the CLIP
    image encoder a FaceID Plus checkpoint reads the face with (checked here, recorded in the prior)."""
    from idto3d.priors.prior import build_prior, save_prior

    if domain not in MAKE_DOMAINS:
        raise IdtoError(f"make-prior makes a normal or an albedo prior, got {domain!r}")
    conventions = conventions or conv.DEFAULT_PRESET[domain]
    chosen = conv.preset(conventions)
    if uncond_id is not None:
        chosen = conv.Conventions.from_dict({**chosen.to_dict(), "uncond_id": uncond_id}, "--uncond-id")
    ip_path = Path(ip_adapter) if ip_adapter is not None else None
    if ip_path is not None and not ip_path.is_file():
        raise IdtoError(f"IP-Adapter checkpoint not found: {ip_path}")
    checkpoint_dim = _faceid_id_dim(ip_path) if ip_path is not None else None
    if id_dim is not None and checkpoint_dim is not None and id_dim != checkpoint_dim:
        raise IdtoError(f"--id-dim {id_dim} does not match {ip_path.name}, whose ID projection takes "
                        f"{checkpoint_dim}-D embeddings")
    dim = checkpoint_dim or id_dim or 512
    expects = record_of(recogniser) if recogniser is not None else (dict(FACEID_RECOGNISER) if ip_path else None)
    if fuse_lora and ip_path is None:
        raise IdtoError("--fuse-lora needs --ip-adapter (the LoRA is FaceID's own)")
    if image_encoder is not None:
        if ip_path is None:
            raise IdtoError("--image-encoder is for FaceID Plus checkpoints: give --ip-adapter too")
        image_encoder = _checked_image_encoder(image_encoder, ip_path)
    out = Path(out)
    if (out / "prior_config.json").exists() or (out / "adapters.safetensors").exists():
        raise IdtoError(f"{out} already holds a prior; choose another --out or remove it")
    if vae is not None and Path(vae).expanduser().is_dir():
        vae = str(Path(vae).expanduser().resolve())  # recorded: the folder wherever make-prior was run from
    prior = build_prior(base_model, domain, dim, adapter, vae=vae, seed=seed, conventions_arg=chosen,
                        recogniser=expects)
    _silence_branches(prior, keep_id=False)
    if ip_path is not None:
        prior.load_ip_adapter_faceid(ip_path, fuse_lora=fuse_lora, image_encoder=image_encoder)
    save_prior(prior, out)
    return MadePrior(out=out, base_model=prior.spec.base_model, vae=prior.spec.vae, conventions=chosen.name,
                     id_dim=dim, ip_adapter=prior.spec.ip_adapter, recogniser=expects,
                     adapters=sum(p.numel() for p in prior.trainable_parameters()))
