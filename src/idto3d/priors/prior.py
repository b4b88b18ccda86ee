"""A 2D prior: an SD1.5-architecture base model plus our adapters, built, saved and loaded in one call each.

A saved prior is a folder::

    prior_config.json      PriorSpec: base model id/path, domain, adapter sizes, embedding sizes
    adapters.safetensors   adapter weights only (LoRA, ID/expression K/V, the two projections)
    unet/                  only when training changed the base UNet too (``prior.train.base``): its weights in
                           diffusers' layout (config.json, diffusion_pytorch_model.safetensors), laid over the
                           base model's on loading

The base model is any SD1.5-architecture diffusers folder or hub id; it is only ever read from disk
(``local_files_only=True``), so an absent model fails at once with what to download and where to put it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from idto3d.core.atomic import atomic_write, atomic_write_text
from idto3d.core.errors import IdtoError
from idto3d.priors import adapters as ad
from idto3d.priors import conventions
from idto3d.priors.expression_embeddings import expression_embeddings
from idto3d.core.expressions import expression_index

FORMAT = "idto3d.prior/1"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"  # a trained base UNet, diffusers' layout
BASE_LORA = "base_lora.safetensors"  # a LoRA fused into the frozen base UNet on loading (FaceID's own)
# "photo": a base text-to-image model used as is (adapters stay zero and get no tokens): texture refinement.
DOMAINS = ("normal", "albedo", "photo")
ID_DIMS = {128: "dlib", 512: "ArcFace"}


@dataclass
class PriorSpec:
    """Everything needed to rebuild a prior's modules (saved as ``prior_config.json``)."""

    base_model: str
    domain: str
    id_dim: int
    exp_dim: int = 0               # CLIP text hidden size; 0 = take it from the base model's text encoder
    self_attn_rank: int = 16
    cross_attn_rank: int = 32
    id_tokens: int = 4
    exp_tokens: int = 4
    vae: str | None = None          # a separate VAE folder/id (e.g. for "noVAE" checkpoints); None = base's
    format: str = FORMAT
    # Added later; absent in older folders (None = the behaviour of those folders):
    conventions: dict | None = None      # priors.conventions.Conventions.to_dict(); None = legacy
    recogniser: dict | None = None       # {"model": file name, "sha256": hex or None} the ID branch expects
    base_fingerprint: list | None = None  # statistics of a few base UNet tensors: a substituted base must match
    ip_adapter: dict | None = None       # {"file", "kind", "lora": "fused" | "ignored" | "none"}
    # FaceID Plus (v2): the perceiver projection's sizes and the CLIP image encoder it reads (faceid.plus_spec)
    id_projection: dict | None = None
    latents: dict | None = None          # {"mode": "downsample", "size": N} the prior was trained on; None = VAE
    unet_weights: str | None = None      # UNET_WEIGHTS when the folder holds its own trained base UNet

    def __post_init__(self) -> None:
        if self.conventions is not None:
            from idto3d.priors.conventions import Conventions

            Conventions.from_dict(self.conventions)  # validated when read, not first at an SDS step
        if self.domain not in DOMAINS:
            raise IdtoError(f"unknown prior domain '{self.domain}'; allowed: {', '.join(DOMAINS)}")
        if self.id_dim <= 0:
            raise IdtoError(f"id_dim must be positive, got {self.id_dim}")


class Prior(nn.Module):
    """Frozen SD1.5 components + trainable adapters; ``predict_noise`` is eps(z_t, t, text, id, expression)."""

    def __init__(self, spec: PriorSpec, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module,
                 tokenizer: Any, noise_scheduler: Any, seed: int = 0) -> None:
        super().__init__()
        from diffusers.models.embeddings import ImageProjection, IPAdapterFaceIDImageProjection

        for m in (unet, vae, text_encoder):
            m.requires_grad_(False)
            m.eval()
        if not spec.exp_dim:
            spec = dataclasses.replace(spec, exp_dim=int(text_encoder.config.hidden_size))
        self.spec = spec
        self.conventions = conventions.of_spec(spec)
        # FaceID's LoRA fused into the frozen UNet (kept to save with the prior): name -> (down, up)
        self.base_lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.noise_scheduler = tokenizer, noise_scheduler
        ref = next(unet.parameters())
        cross = int(unet.config.cross_attention_dim)
        with torch.random.fork_rng(devices=[]):  # fresh adapters are a function of the seed alone
            torch.manual_seed(seed)
            ad.install_adapters(unet, spec.self_attn_rank, spec.cross_attn_rank)
            # IP-Adapter-FaceID's MLPProjModel (id -> 2*id -> tokens*cross, LayerNorm): its checkpoints load as is;
            # FaceID Plus's perceiver over CLIP face features when the spec says so.
            self.id_proj = (plus_projection(spec.id_projection, spec.id_dim, cross) if spec.id_projection else
                            IPAdapterFaceIDImageProjection(image_embed_dim=spec.id_dim, cross_attention_dim=cross,
                                                           mult=2, num_tokens=spec.id_tokens)).to(ref.device, ref.dtype)
            # IP-Adapter's original linear projection + LayerNorm for the CLIP expression embedding.
            self.exp_proj = ImageProjection(image_embed_dim=spec.exp_dim, cross_attention_dim=cross,
                                            num_image_text_embeds=spec.exp_tokens).to(ref.device, ref.dtype)
        self._text_cache: dict[str, torch.Tensor] = {}
        self._exp_table: torch.Tensor | None = None
        self._face_features: tuple[torch.Tensor, torch.Tensor] | None = None  # FaceID Plus: (cond, uncond)
        # What priors.runtime.configure_prior applied (device, precision, kernels); empty = as built.
        self.runtime: dict[str, Any] = {}

    # -- properties -------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the UNet and VAE forward passes when the prior's weights are half precision:
        fp32 inputs (renders, guidance's latents) and any fp32 module are cast per op by autocast."""
        dtype = self.dtype
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _memory_format(self, x: torch.Tensor) -> torch.Tensor:
        # NHWC inputs for NHWC weights: a contiguous input would make the first convolution convert back.
        return x.contiguous(memory_format=torch.channels_last) if self.runtime.get("channels_last") else x

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The image size the base model was trained at (512 for SD1.5)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    # -- conditioning -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP last hidden states ``[B, 77, C]`` (memoised per prompt: SDS reuses a handful of prompts)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            ids = self.tokenizer(list(missing), padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)
            hidden = self.text_encoder(ids)[0]
            if len(self._text_cache) > 256:
                self._text_cache.clear()
            self._text_cache.update(zip(missing, hidden))
        return torch.stack([self._text_cache[p] for p in prompts]).to(self.device, self.dtype)

    def expression_table(self, cache_dir: str | Path | None = None) -> torch.Tensor:
        """All 23 descriptors' CLIP pooled embeddings ``[23, D_clip]`` (disk-cached per text encoder)."""
        if self._exp_table is None:
            self._exp_table = expression_embeddings(self.text_encoder, self.tokenizer, cache_dir)
        return self._exp_table

    def encode_expressions(self, names: Sequence[str]) -> torch.Tensor:
        """``[B, D_clip]`` CLIP embeddings of the named expressions' descriptors (unknown names raise)."""
        if isinstance(names, str):
            names = [names]
        idx = [expression_index(n) for n in names]
        table = self.expression_table()
        if table.device != self.device or table.dtype != self.dtype:  # once: not a host copy every step
            table = self._exp_table = table.to(self.device, self.dtype)
        return torch.stack([table[i] for i in idx])  # integer views: a list index would be a host tensor

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Renders ``[B,3,H,W]`` in [0,1] -> scaled VAE latents (posterior mean), differentiable; fp32
        whatever the prior's dtype (gradients reach fp32 renders in fp32)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encode_images expects [B, 3, H, W] images, got {tuple(images.shape)}")
        with self.autocast():
            x = self._memory_format(images.to(self.device, self.dtype) * 2.0 - 1.0)
            posterior = self.vae.encode(x).latent_dist
        return posterior.mean.float() * self.vae.config.scaling_factor

    @property
    def needs_face_features(self) -> bool:
        """FaceID Plus: the ID tokens also read CLIP image features of the face (``set_face_features``)."""
        return self.spec.id_projection is not None

    def set_face_features(self, cond: torch.Tensor, uncond: torch.Tensor) -> None:
        """The CLIP features (``[seq, hidden]``) of the person's aligned face and of a zero input (the
        unconditional branch), from ``identity.clip_face``."""
        hidden = int(self.spec.id_projection["hidden_dims"])
        for what, x in (("cond", cond), ("uncond", uncond)):
            if x.ndim != 2 or x.shape[-1] != hidden:
                raise IdtoError(f"FaceID Plus face features ({what}) must be [tokens, {hidden}] (the prior's CLIP "
                                f"image encoder's width), got {tuple(x.shape)}")
        self._face_features = (cond.to(self.device, self.dtype), uncond.to(self.device, self.dtype))

    def id_tokens(self, id_embedding: torch.Tensor, batch: int, unconditional: bool = False) -> torch.Tensor:
        """ID tokens ``[B, n, cross]``; ``unconditional``: FaceID Plus's CFG branch (the zero-input features)."""
        emb = _batched(id_embedding, batch, "id_embedding")
        if emb.shape[-1] != self.spec.id_dim:
            raise IdtoError(_id_size_message(emb.shape[-1], self.spec.id_dim))
        if self.needs_face_features:
            if self._face_features is None:
                raise IdtoError("this prior is IP-Adapter FaceID Plus: its ID tokens need CLIP features of the face "
                                "(generate computes them from the photos; call prior.set_face_features)")
            feats = self._face_features[1 if unconditional else 0].to(self.device, self.dtype)
            # diffusers' projection reads its CLIP input from this attribute: [B, images=1, seq, hidden]
            self.id_proj.clip_embeds = feats[None, None].expand(emb.shape[0], 1, -1, -1)
        return self.id_proj(emb.to(self.device, self.dtype))

    def exp_tokens(self, exp_embedding: torch.Tensor, batch: int) -> torch.Tensor:
        emb = _batched(exp_embedding, batch, "exp_embedding")
        if emb.shape[-1] != self.spec.exp_dim:
            raise IdtoError(f"expression embedding has {emb.shape[-1]} values but this prior expects "
                            f"{self.spec.exp_dim} (its text encoder's size); use prior.encode_expressions")
        return self.exp_proj(emb.to(self.device, self.dtype))

    # -- the model --------------------------------------------------------------------------------------
    def set_scales(self, lambda_id: float | None = None, lambda_exp: float | None = None) -> None:
        """Default weights of the ID and expression branches (eq. 4); per-call arguments override them."""
        ad.set_adapter_scales(self.unet, lambda_id, lambda_exp)

    def predict_noise(self, latents: torch.Tensor, timesteps: int | torch.Tensor, text_emb: torch.Tensor,
                      id_embedding: torch.Tensor | None = None, exp_embedding: torch.Tensor | None = None,
                      lambda_id: float | torch.Tensor | None = None,
                      lambda_exp: float | torch.Tensor | None = None) -> torch.Tensor:
        """Noise prediction. ``None`` embeddings contribute nothing; lambdas may be floats or per-sample [B]."""
        b = latents.shape[0]
        return self.predict_noise_tokens(
            latents, timesteps, text_emb,
            id_tokens=None if id_embedding is None else self.id_tokens(id_embedding, b),
            exp_tokens=None if exp_embedding is None else self.exp_tokens(exp_embedding, b),
            lambda_id=lambda_id, lambda_exp=lambda_exp)

    def predict_noise_tokens(self, latents: torch.Tensor, timesteps: int | torch.Tensor, text_emb: torch.Tensor,
                             id_tokens: torch.Tensor | None = None, exp_tokens: torch.Tensor | None = None,
                             lambda_id: float | torch.Tensor | None = None,
                             lambda_exp: float | torch.Tensor | None = None) -> torch.Tensor:
        """``predict_noise`` with already projected ID/expression tokens ``[B, n, cross_dim]``. The result is
        fp32 whatever the prior's dtype, so guidance's scaled CFG difference is taken in fp32."""
        b = latents.shape[0]
        if isinstance(timesteps, int):  # filled on the device: copying a host value there would wait for the GPU
            t = torch.full((b,), timesteps, dtype=torch.long, device=self.device)
        else:
            t = torch.as_tensor(timesteps, device=self.device)
            t = t.expand(b) if t.ndim == 0 else t
        text = text_emb.to(self.device, self.dtype)
        if text.shape[0] == 1 and b > 1:
            text = text.expand(b, -1, -1)
        kwargs = {"id_tokens": id_tokens, "exp_tokens": exp_tokens, "lambda_id": lambda_id, "lambda_exp": lambda_exp}
        with self.autocast():
            sample = self.unet(self._memory_format(latents.to(self.device, self.dtype)), t,
                               encoder_hidden_states=text, cross_attention_kwargs=kwargs).sample
        return sample.float()

    def adapter_modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {f"unet.{k}": p for k, p in ad.adapter_processors(self.unet).items()}
        mods.update({"id_proj": self.id_proj, "exp_proj": self.exp_proj})
        return mods

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for m in self.adapter_modules().values() for p in m.parameters()]
        return params + list(self.base_unet_parameters().values()) if self.spec.unet_weights else params

    def base_unet_parameters(self) -> dict[str, nn.Parameter]:
        """The base UNet's own weights (diffusers' names), without the adapter processors installed in it."""
        return {n: p for n, p in self.unet.named_parameters() if ".processor." not in n}

    def train_base_unet(self) -> None:
        """Make the base UNet trainable with the adapters (a base built from config); saved with the prior."""
        for p in self.base_unet_parameters().values():
            p.requires_grad_(True)
        self.spec = dataclasses.replace(self.spec, unet_weights=UNET_WEIGHTS)

    def load_base_unet_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        own = self.base_unet_parameters()
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra or any(own[k].shape != v.shape for k, v in state.items()):
            raise IdtoError(f"{source}: the UNet weights do not match this prior's base model "
                            f"(missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v.to(own[k].device, own[k].dtype))

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{k}": v for prefix, m in self.adapter_modules().items()
                for k, v in m.state_dict().items()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], source: str = "adapters") -> None:
        own = self.adapter_state_dict()
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            raise IdtoError(f"{source}: adapter weights do not match this prior "
                            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})")
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise IdtoError(f"{source}: '{k}' has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        for prefix, m in self.adapter_modules().items():
            m.load_state_dict({k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")})

    def load_ip_adapter_faceid(self, path: str | Path, fuse_lora: bool = False,
                               image_encoder: str | Path | None = None) -> dict[str, int]:
        """Initialise the ID branch from an ``ip-adapter-faceid(-plus/-plusv2)_sd15`` checkpoint (.bin or
        .safetensors); ``fuse_lora`` also adds FaceID's own LoRA (trained with its ID K/V) into the frozen UNet.
        A Plus checkpoint replaces the ID projection with its perceiver and records ``image_encoder``."""
        from idto3d.priors import faceid

        state = ad.read_faceid_checkpoint(path)
        kind = faceid.checkpoint_kind(state["image_proj"], str(path))
        if kind in faceid.PLUS_KINDS:
            if image_encoder is None:
                raise IdtoError(f"{path}: an IP-Adapter FaceID Plus{' v2' if kind == faceid.FACEID_PLUS_V2 else ''} "
                                f"checkpoint: its ID tokens also read CLIP ViT-H image features of the face; give "
                                f"--image-encoder (e.g. h94/IP-Adapter's models/image_encoder folder)")
            plus = faceid.plus_spec(state["image_proj"], kind, str(image_encoder))
            self.spec = dataclasses.replace(self.spec, id_projection=plus)
            ref = next(self.unet.parameters())
            self.id_proj = plus_projection(plus, self.spec.id_dim, int(self.unet.config.cross_attention_dim)
                                           ).to(ref.device, ref.dtype)
        report = ad.load_faceid_state(self.unet, self.id_proj, state, source=str(path))
        deltas = faceid.lora_deltas(self.unet, state["ip_adapter"], str(path))
        if fuse_lora and deltas:
            self.fuse_base_lora(deltas)
        report["fused_lora"] = len(deltas) if fuse_lora else 0
        self.spec = dataclasses.replace(self.spec, ip_adapter={
            "file": Path(path).name, "kind": kind,
            "lora": "fused" if fuse_lora and deltas else ("ignored" if deltas else "none")})
        return report

    def fuse_base_lora(self, deltas: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        from idto3d.priors import faceid

        if self.base_lora:
            raise IdtoError("this prior already has a LoRA fused into its base UNet")
        faceid.fuse_lora(self.unet, deltas)
        self.base_lora = {k: (d.detach().float().cpu(), u.detach().float().cpu()) for k, (d, u) in deltas.items()}

    def parameter_breakdown(self) -> dict[str, int | float]:
        return ad.adapter_parameter_breakdown(self.unet, self.id_proj, self.exp_proj)


def plus_projection(plus: dict, id_dim: int, cross: int) -> nn.Module:
    """diffusers' ``IPAdapterFaceIDPlusImageProjection`` sized as ``PriorSpec.id_projection`` records; the v2
    shortcut (ID tokens + scale x perceiver output) as the checkpoint's kind says."""
    from diffusers.models.embeddings import IPAdapterFaceIDPlusImageProjection

    proj = IPAdapterFaceIDPlusImageProjection(
        embed_dims=int(plus["embed_dims"]), output_dims=cross, hidden_dims=int(plus["hidden_dims"]),
        id_embeddings_dim=id_dim, depth=int(plus["depth"]), heads=int(plus["heads"]),
        num_tokens=int(plus["num_tokens"]))
    proj.shortcut = bool(plus.get("shortcut", False))
    proj.shortcut_scale = float(plus.get("shortcut_scale", 1.0))
    return proj


def _batched(emb: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    if emb.ndim == 1:
        emb = emb.unsqueeze(0)
    if emb.ndim != 2 or emb.shape[0] not in (1, batch):
        raise ValueError(f"{what} must be [D] or [B, D] with B = {batch}, got {tuple(emb.shape)}")
    return emb.expand(batch, -1) if emb.shape[0] == 1 else emb


def identity_dim(path: str | Path) -> int:
    """The embedding size D of an identity file (contracts: ``embedding`` [D], metadata ``dim``): the
    ``id_dim`` to build a prior with for it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise IdtoError(f"identity file not found: {path} (make one with `idto3d identity photos/*.jpg -o ...`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return int(f.get_slice("embedding").get_shape()[-1])
    except Exception as exc:  # not safetensors, or no 'embedding' tensor
        raise IdtoError(f"{path} is not an identity file ({type(exc).__name__}: {exc})") from None


def _id_size_message(got: int, want: int) -> str:
    name = lambda d: f"{d} ({ID_DIMS[d]})" if d in ID_DIMS else str(d)  # noqa: E731
    return (f"identity embedding has {name(got)} values but this prior's ID projection expects {name(want)}: "
            f"compute the identity with the matching backend (identity.backend) or use a prior built for "
            f"id_dim={got}")


# ---- loading base models ---------------------------------------------------------------------------------

def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or "\\" in ref or os.path.exists(ref)


PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def download_command(ref: str, parts: Sequence[str] = PIPELINE_PARTS, standalone_vae: bool = False) -> str:
    """``huggingface-cli download`` of only what a prior loads: the pipeline's subfolders (never the
    multi-GB single-file checkpoints many repositories also hold at the top level), or a standalone VAE."""
    if standalone_vae:
        include = ["config.json", "diffusion_pytorch_model.safetensors"]
    else:
        include = ["model_index.json"] + [f"{p}/*" for p in parts]
    return f"huggingface-cli download {ref} --include {' '.join(repr(i) for i in include)}"


def _absent_message(ref: str, what: str, exc: Exception, standalone_vae: bool = False) -> str:
    cmd = download_command(ref, standalone_vae=standalone_vae)
    return (f"base model '{ref}' ({what}) is not available offline ({type(exc).__name__}). Download it on a "
            f"machine with internet: `{cmd} --local-dir <folder>`, copy the folder here and set "
            f"prior.base_model=<folder> (prior.vae for a VAE); or fill the Hugging Face cache (HF_HOME) with "
            f"`{cmd}`")


def _load_part(sub: str, cls: Any, src: str, vae_ref: str | None, dtype: Any) -> Any:
    # A standalone VAE (e.g. stabilityai/sd-vae-ft-mse) has its weights at the top level.
    standalone_vae = sub == "vae" and vae_ref and not (Path(vae_ref) / "vae").is_dir()
    kw: dict[str, Any] = {"local_files_only": True}
    if not standalone_vae:
        kw["subfolder"] = sub
    if sub in ("unet", "vae"):
        kw["torch_dtype"] = dtype or torch.float32  # lets diffusers keep its fp32-only modules in fp32
    try:
        return cls.from_pretrained(src, **kw)
    except (OSError, ValueError) as exc:
        if Path(src).is_dir():
            raise IdtoError(f"base model folder {src} has no loadable {sub}/ ({exc.__class__.__name__}: "
                            f"{str(exc).splitlines()[0][:200]})") from None
        raise IdtoError(_absent_message(src, sub, exc, bool(standalone_vae))) from None


def _load_base(base_model: str, vae_ref: str | None, device: Any, dtype: Any) -> tuple:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as hf_logging

    ref = str(base_model)
    if _looks_like_path(ref):
        folder = Path(ref).expanduser()
        if not folder.is_dir():
            raise IdtoError(f"base model folder not found: {folder} (set prior.base_model to an SD1.5 "
                            f"diffusers folder with unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
        ref = str(folder.resolve())
    parts = (("unet", UNet2DConditionModel, ref), ("vae", AutoencoderKL, vae_ref or ref),
             ("text_encoder", CLIPTextModel, ref), ("tokenizer", CLIPTokenizer, ref),
             ("scheduler", DDPMScheduler, ref))
    out = {}
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # diffusers passes huggingface_hub a deprecated argument: noise, not the user's concern
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            for sub, cls, src in parts:
                out[sub] = _load_part(sub, cls, src, vae_ref, dtype)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    for sub in ("unet", "vae"):
        out[sub].to(device or "cpu")
    out["text_encoder"].to(device=device or "cpu", dtype=dtype or torch.float32)
    return ref, out


def _check_prediction(scheduler: Any, ref: str) -> None:
    conventions.check_prediction_type(str(getattr(scheduler.config, "prediction_type", "epsilon")),
                                      f"base model {ref}")


FINGERPRINT_RTOL = 1e-3


def base_fingerprint(unet: nn.Module) -> list[float]:
    """Mean |w| and mean w^2 of a few UNet tensors (first and last convolution, first and last cross-attention
    key): tells a substituted base model from the one a prior was made with (same architecture, other weights)
    without hashing 3 GB. Statistics rather than a hash, so the same weights loaded in fp16 / bf16 / fp32 match
    (rounding is unbiased: it moves a mean over >= 10^4 values far less than ``FINGERPRINT_RTOL``)."""
    keys = [n for n, _ in unet.named_parameters() if n.endswith("attn2.to_k.weight")]
    out = []
    for name in ["conv_in.weight", "conv_out.weight"] + keys[:1] + keys[-1:]:
        t = unet.get_parameter(name).detach().float()
        out += [float(t.abs().mean()), float(t.square().mean())]
    return out


def _same_base(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= FINGERPRINT_RTOL * max(abs(x), abs(y)) for x, y in zip(a, b))


def _check_architecture(unet: nn.Module, ref: str) -> None:
    cfg = unet.config
    if cfg.in_channels != 4 or any("CrossAttn" not in t for t in cfg.down_block_types[:3]):
        raise IdtoError(f"base model {ref} is not an SD1.5-architecture UNet (in_channels={cfg.in_channels}, "
                        f"down blocks {list(cfg.down_block_types)})")


def build_prior(base_model: str | Path, domain: str, id_dim: int, adapter: Any = None, *,
                device: Any = None, dtype: Any = None, vae: str | None = None, seed: int = 0,
                conventions_arg: Any = None, recogniser: dict | None = None) -> Prior:
    """A fresh prior: ``base_model``'s weights + adapters sized by ``adapter`` (an ``AdapterConfig``;
    default: the paper's sizes), initialised from ``seed``. ``vae`` names a separate VAE folder/id;
    ``conventions_arg`` (``Conventions`` or its dict; None = legacy) and ``recogniser`` are recorded."""
    from idto3d.core.config import AdapterConfig

    adapter = adapter or AdapterConfig()
    ref, parts = _load_base(str(base_model), vae, device, dtype)
    _check_architecture(parts["unet"], ref)
    _check_prediction(parts["scheduler"], ref)
    conv = conventions_arg.to_dict() if isinstance(conventions_arg, conventions.Conventions) else conventions_arg
    spec = PriorSpec(base_model=ref, domain=domain, id_dim=int(id_dim), self_attn_rank=adapter.self_attn_rank,
                     cross_attn_rank=adapter.cross_attn_rank, id_tokens=adapter.id_tokens,
                     exp_tokens=adapter.exp_tokens, vae=vae, conventions=conv, recogniser=recogniser,
                     base_fingerprint=base_fingerprint(parts["unet"]))
    return Prior(spec, parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"],
                 seed=seed)


def save_prior(prior: Prior, folder: str | Path) -> None:
    """Write ``prior_config.json`` + ``adapters.safetensors`` (each atomically; weights first)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = dataclasses.asdict(prior.spec)
    state = {k: v.detach().contiguous().cpu() for k, v in prior.adapter_state_dict().items()}
    atomic_write(folder / "adapters.safetensors",
                 lambda p: save_file(state, str(p), metadata={"format": FORMAT, "spec": json.dumps(spec)}))
    if prior.base_lora:
        from idto3d.priors.faceid import lora_state

        lora = lora_state(prior.base_lora)
        atomic_write(folder / BASE_LORA, lambda p: save_file(lora, str(p), metadata={"format": FORMAT}))
    if prior.spec.unet_weights:
        _save_base_unet(prior, folder)
    atomic_write_text(folder / "prior_config.json", json.dumps(spec, indent=2) + "\n")


def _save_base_unet(prior: Prior, folder: Path) -> None:
    """The trained base UNet in diffusers' layout (a ``UNet2DConditionModel.from_pretrained`` folder)."""
    from safetensors.torch import save_file

    unet_dir = folder / Path(UNET_WEIGHTS).parent
    unet_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in prior.base_unet_parameters().items()}
    state.update({k: v.detach().contiguous().cpu() for k, v in prior.unet.named_buffers() if ".processor." not in k})
    atomic_write(folder / UNET_WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    atomic_write_text(unet_dir / "config.json", prior.unet.to_json_string())


def _resolve_prior_folder(path_or_id: str | Path) -> Path:
    ref = str(path_or_id)
    if not _looks_like_path(ref) and ref.count("/") == 1:
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(ref, local_files_only=True))
        except Exception as exc:  # hub errors have many types; all mean "not on this machine"
            raise IdtoError(f"prior '{ref}' is not a folder and not in the local Hugging Face cache "
                            f"({type(exc).__name__}); download it with `huggingface-cli download {ref}` "
                            f"or pass the folder path") from None
    folder = Path(ref).expanduser()
    if not folder.is_dir():
        raise IdtoError(f"prior folder not found: {folder}")
    return folder


def read_prior_spec(folder: str | Path) -> PriorSpec:
    folder = Path(folder)
    path = folder / "prior_config.json"
    if not path.is_file():
        raise IdtoError(f"{folder} is not an idto3d prior: no prior_config.json (make one with make-prior or train-prior)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise IdtoError(f"cannot read {path}: {exc}") from None
    if data.get("format") != FORMAT:
        raise IdtoError(f"{path}: unknown format {data.get('format')!r}, expected {FORMAT!r}")
    known = {f.name for f in dataclasses.fields(PriorSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise IdtoError(f"{path}: unknown keys {unknown}")
    return PriorSpec(**data)


def _load_recorded_or(spec: PriorSpec, base_model: str | Path | None, vae: str | None, prefer_recorded: bool,
                      device: Any, dtype: Any) -> tuple[str, dict, str | None]:
    """The base model parts: the recorded base (and VAE) unless overridden; with ``prefer_recorded`` the
    given ones serve only when the recorded ones are not on this machine."""
    recorded = (spec.base_model, spec.vae)
    given = (str(base_model) if base_model else spec.base_model, vae if vae is not None else spec.vae)
    if spec.vae is None:
        given = (given[0], None)  # the base's own VAE: a configured separate VAE does not replace it
    if not prefer_recorded or recorded == given:
        ref, parts = _load_base(given[0], given[1], device, dtype)
        return ref, parts, given[1]
    try:
        ref, parts = _load_base(recorded[0], recorded[1], device, dtype)
        return ref, parts, recorded[1]
    except IdtoError as missing:
        try:
            ref, parts = _load_base(given[0], given[1], device, dtype)
        except IdtoError as also:
            raise IdtoError(f"{missing} -- and prior.base_model / prior.vae ({given[0]}, {given[1]}) cannot "
                            f"stand in for it: {also}") from None
        return ref, parts, given[1]


def load_prior(path_or_id: str | Path, *, device: Any = None, dtype: Any = None,
               base_model: str | Path | None = None, vae: str | None = None,
               prefer_recorded: bool = False) -> Prior:
    """Load a saved prior (folder or hub id). ``base_model`` / ``vae`` override the recorded base model and VAE
    locations (e.g. when the prior was saved on another machine); with ``prefer_recorded`` they are used only
    when the recorded ones cannot be loaded here. A substituted base must be the same model: priors that
    record a fingerprint of their base refuse another one."""
    from safetensors.torch import load_file

    folder = _resolve_prior_folder(path_or_id)
    spec = read_prior_spec(folder)
    weights = folder / "adapters.safetensors"
    if not weights.is_file():
        raise IdtoError(f"{folder}: adapters.safetensors is missing")
    ref, parts, vae_ref = _load_recorded_or(spec, base_model, vae, prefer_recorded, device, dtype)
    _check_architecture(parts["unet"], ref)
    _check_prediction(parts["scheduler"], ref)
    if spec.base_fingerprint and not _same_base(base_fingerprint(parts["unet"]), spec.base_fingerprint):
        raise IdtoError(f"{folder} was made with base model {spec.base_model} but {ref} has other weights; set "
                        f"prior.base_model to a copy of the base model the prior was made with")
    if parts["text_encoder"].config.hidden_size != spec.exp_dim:
        raise IdtoError(f"{folder}: saved for a {spec.exp_dim}-D text encoder but base model {ref} has "
                        f"{parts['text_encoder'].config.hidden_size}-D")
    prior = Prior(dataclasses.replace(spec, base_model=ref, vae=vae_ref), parts["unet"], parts["vae"],
                  parts["text_encoder"], parts["tokenizer"], parts["scheduler"])
    try:
        state = load_file(str(weights))
        lora = load_file(str(folder / BASE_LORA)) if (folder / BASE_LORA).is_file() else {}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise IdtoError(f"cannot read the weights in {folder}: {exc}") from None
    prior.load_adapter_state_dict(state, source=str(weights))
    if spec.unet_weights:
        _load_base_unet(prior, folder / spec.unet_weights)
    if lora:
        from idto3d.priors.faceid import deltas_from_state

        prior.fuse_base_lora(deltas_from_state(lora))
    return prior


def _load_base_unet(prior: Prior, path: Path) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise IdtoError(f"{path.parent.parent}: {path.relative_to(path.parent.parent)} is missing (the prior was "
                        f"trained with its base UNet)")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise IdtoError(f"cannot read the weights in {path}: {exc}") from None
    buffers = dict(prior.unet.named_buffers())
    params = {k: v for k, v in state.items() if k not in buffers}
    prior.load_base_unet_state_dict(params, source=str(path))


def load_photo_prior(base_model: str | Path, *, vae: str | None = None, device: Any = None,
                     dtype: Any = None) -> Prior:
    """A plain SD-architecture text-to-image model (the texture stage's photoreal refinement) as a ``Prior``.

    Its adapters are freshly built: LoRA up-projections start at zero and the ID/expression branches get no
    tokens when guidance passes no ID or expression, so it predicts exactly what the base model predicts.
    """
    return build_prior(base_model, "photo", id_dim=1, vae=vae, device=device, dtype=dtype)
