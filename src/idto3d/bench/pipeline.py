"""``idto3d bench pipeline``: one geometry and one texture SDS iteration on a device, split into its parts.

Parts per stage: the field (SDF + marching tets; or baking the UV textures), the render (normals + mask; or the
shaded pseudo-albedo), the guidance (encode + UNet with classifier-free guidance, batch 2), backward and the
Adam step; plus the peak memory (CPU: the process's max RSS; CUDA: ``torch.cuda.max_memory_allocated``) and
the projected wall time of the ``paper`` preset's iteration counts, next to the paper's V100 figures.

Runs: the tiny random SD1.5-architecture prior (always; its total per stage is the baseline of every row of
that stage) and, with ``full_size``, a prior of the full SD1.5 architecture (860M UNet + 84M VAE + 123M CLIP-L
text encoder) built from config with random weights. Its speed does not depend on the weights' values, so this
measures the real cost of an iteration without downloading a model. No CLIP vocabulary ships with
``transformers`` and none is downloaded, so the full-size prior uses the tiny prior's tokenizer: the text
encoder runs only on prompts, memoised before timing, so this changes nothing that is timed. The same full-size
network serves both stages (the normal and albedo priors share one architecture). Full-size runs use the
paper's guidance setting: VAE latents of 512 px renders (``latent_size`` 64).
"""

from __future__ import annotations

import platform
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from idto3d.core.config import Config, load_config
from idto3d.core.errors import IdtoError
from idto3d.bench.steps import time_geometry_step, time_texture_step
from idto3d.core.device import resolve_device


# Paper, section B (V100): neutral geometry 6000 it. ~30 min, neutral texture 2000 it. ~15 min; 13 expressions:
# geometry ~4 h, texture ~10000 iterations (its time is not stated).
PAPER_NEUTRAL_MIN = {"geometry": 30.0, "texture": 15.0}
PAPER_13_GEOMETRY_MIN = 240.0
PAPER_13_TEXTURE_ITERATIONS = 10000
# The paper gives no geometry iteration count for 13 expressions: we assume its per-iteration cost stays the
# neutral one (30 min / 6000), so ~4 h is 8x the neutral count.
ASSUMED_13_GEOMETRY_ITERATIONS = 48000


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    # ru_maxrss: KiB on Linux, bytes on macOS; a process-wide high-water mark (never goes down)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def _bench_config(preset: str, quick: bool, full_size: bool, overrides: list[str] | None = None) -> Config:
    user = list(overrides or [])
    overrides = []
    if quick:
        overrides += ["geometry.grid_resolution=24", "render.resolution=64", "prior.guidance.latent_size=8",
                      "texture.resolution=64", "texture.encoding.max_resolution=32"]
    if full_size:  # the paper's setting: SD1.5 VAE latents (64x64) of 512 px renders
        overrides += ["render.resolution=512", "prior.guidance.latent_mode=vae", "prior.guidance.latent_size=64"]
    return load_config(preset, None, overrides + user)


# ---- priors -----------------------------------------------------------------------------------------------

def sd15_vae_config() -> dict[str, Any]:
    """The Stable Diffusion 1.5 VAE's config (``vae/config.json``)."""
    return {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2, "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32,
            "sample_size": 512, "scaling_factor": 0.18215}


def _full_size_prior(tiny: Any, device: torch.device) -> Any:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from idto3d.priors.prior import Prior, PriorSpec
    from idto3d.priors.tiny import sd15_unet_config

    tok = tiny.tokenizer
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**sd15_unet_config())
    vae = AutoencoderKL(**sd15_vae_config())
    # CLIP ViT-L/14's text tower (SD1.5's text encoder); bos/eos are the tokenizer's ids (pooling uses eos).
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=768, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    for m in (unet, vae, text):
        m.to(device)
    spec = PriorSpec(base_model="sd15-from-config (random weights)", domain="normal", id_dim=512)
    return Prior(spec, unet, vae, text, tok, tiny.noise_scheduler, seed=0)


def _params_m(prior: Any) -> float:
    return sum(p.numel() for m in (prior.unet, prior.vae, prior.text_encoder) for p in m.parameters()) / 1e6


# ---- inputs -----------------------------------------------------------------------------------------------

def _textured_expression(cfg: Config, quick: bool, device: torch.device) -> Any:
    from idto3d.texture.uv_atlas import shared_atlas
    from idto3d.geometry.template import build_head_template
    from idto3d.stages.texture_stage import TexturedExpression

    expr = TexturedExpression.from_atlas(shared_atlas([build_head_template(32 if quick else 64)])[0],
                                         cfg.texture.resolution)
    return TexturedExpression(expr.atlas, expr.mesh.to(device), expr.uv.to(device),
                              expr.attribute_faces.to(device), expr.texels.to(device))


# ---- the benchmark ----------------------------------------------------------------------------------------

def projections(per_iteration_ms: dict[str, float]) -> list[tuple[str, float, float, str]]:
    """(case, projected minutes, reference minutes, reference) for the paper preset's schedules."""
    paper = load_config("paper")
    geo, tex = paper.geometry.iterations, paper.texture.iterations
    neutral = (geo * per_iteration_ms["geometry"] + tex * per_iteration_ms["texture"]) / 60000.0
    geo13 = ASSUMED_13_GEOMETRY_ITERATIONS * per_iteration_ms["geometry"] / 60000.0
    tex13 = PAPER_13_TEXTURE_ITERATIONS * per_iteration_ms["texture"] / 60000.0
    paper_neutral = PAPER_NEUTRAL_MIN["geometry"] + PAPER_NEUTRAL_MIN["texture"]
    return [
        (f"neutral: {geo} geometry + {tex} texture it. = {neutral:.1f} min "
         f"(paper: ~{PAPER_NEUTRAL_MIN['geometry']:.0f} + {PAPER_NEUTRAL_MIN['texture']:.0f} min, V100)",
         neutral, paper_neutral, "paper V100, 45 min"),
        (f"13 expressions, geometry: {ASSUMED_13_GEOMETRY_ITERATIONS} it. (assumed: 8x neutral, as ~4 h / ~30 min)"
         f" = {geo13:.0f} min (paper: ~4 h, V100)", geo13, PAPER_13_GEOMETRY_MIN, "paper V100, 4 h"),
        (f"13 expressions, texture: {PAPER_13_TEXTURE_ITERATIONS} it. = {tex13:.0f} min (paper: time not stated)",
         tex13, neutral, "this neutral projection"),
    ]


def _folder_priors(folders: tuple[str, str], dev: torch.device, rt: Any) -> Any:
    """(geometry prior, texture prior) loaded from prior folders (``make-prior`` / ``train-prior``), each with
    its own conventions; loaded one after the other into the run's precision."""
    from idto3d.core.device import resolve_dtype
    from idto3d.priors.prior import load_prior
    from idto3d.priors.prior_runtime import configure_prior

    loaded: dict[int, Any] = {}

    def get(i: int) -> Any:
        if i not in loaded:
            loaded.clear()  # one full-size prior in memory at a time
            loaded[i] = configure_prior(load_prior(folders[i], device=dev, dtype=resolve_dtype(rt.precision, dev)),
                                        rt, dev)
        return loaded[i]

    return get


def bench_pipeline(device: str = "cpu", full_size: bool = False, repeats: int | None = None, quick: bool = False,
                   preset: str = "preview", overrides: list[str] | None = None,
                   prior_folders: tuple[str, str] | None = None) -> list[dict]:
    """Rows in ``render_table``'s format; ``repeats`` None: 1 for a full-size prior on CPU, else 3.
    ``overrides`` are config ``key=value`` pairs, e.g. ``runtime.precision=fp16``; the priors take the
    ``runtime`` section's precision, channels-last, attention and compile settings, the renderer and fields its
    fast paths. ``prior_folders`` (normal, albedo) times the geometry stage with the first and the texture
    stage with the second (their conventions: prompts, negative prompt, background, unconditional ID tokens)
    instead of the random full-size prior."""
    from idto3d.bench.geometry import _fitted_field
    from idto3d.priors.guidance import SDSGuidance
    from idto3d.priors.prior import build_prior
    from idto3d.priors.prior_runtime import configure_prior, runtime_summary
    from idto3d.priors.tiny import make_tiny_base_model

    dev = resolve_device(device)
    if repeats is None:
        repeats = 1 if full_size and dev.type == "cpu" else 3
    if repeats < 1:
        raise IdtoError("--repeats must be > 0")
    torch.manual_seed(0)
    cfg = _bench_config(preset, quick, full_size, overrides)
    gcfg = cfg.prior.guidance
    rt = cfg.runtime
    id_embedding = torch.nn.functional.normalize(torch.randn(512, generator=torch.Generator().manual_seed(0)), dim=0)
    expr = _textured_expression(cfg, quick, dev)
    measured: dict[str, dict[str, dict[str, float]]] = {}
    peaks: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="idto3d-bench-") as tmp:
        tiny = build_prior(make_tiny_base_model(Path(tmp) / "sd", seed=0), "normal", 512, cfg.prior.adapter,
                           device=dev, seed=0)
        configure_prior(tiny, rt, dev)
        runs = [(f"tiny prior ({gcfg.latent_mode}, {runtime_summary(tiny)})", lambda i: tiny, max(repeats, 3))]
        if full_size and prior_folders:
            runs.append(("folders", _folder_priors(prior_folders, dev, rt), repeats))
        elif full_size:
            shared: list[Any] = []
            runs.append(("full", lambda i: shared[0] if shared else shared.append(
                configure_prior(_full_size_prior(tiny, dev), rt, dev)) or shared[0], repeats))
        for name, make, n in runs:
            _reset_peak(dev)
            prior = make(0)
            if name == "full":
                name = f"full-size SD1.5 prior ({_params_m(prior):.0f}M, {gcfg.latent_mode}, {runtime_summary(prior)})"
            elif name == "folders":
                name = (f"prior folders {Path(prior_folders[0]).name} + {Path(prior_folders[1]).name} "
                        f"({_params_m(prior):.0f}M, {gcfg.latent_mode}, {runtime_summary(prior)})")
            total = max(cfg.geometry.iterations, 1)
            # One warm-up only when more than one iteration is timed (a full-size CPU step takes ~40 s).
            timing = dict(warmup=n > 1, prewarm_cache=Path(tmp))
            measured[name] = {
                "geometry": time_geometry_step(cfg, _fitted_field(cfg, dev),
                                               SDSGuidance(prior, gcfg, "geometry", total, seed=0), id_embedding, n,
                                               dev, **timing),
            }
            del prior  # the folders' albedo prior replaces the normal one in memory
            prior = make(1)
            measured[name] |= {
                # The PBR sub-stage: the dearer of the two shadings (20% of a run), so the projection errs high.
                "texture": time_texture_step(cfg, expr, SDSGuidance(prior, gcfg, "texture_pbr",
                                                                    max(cfg.texture.iterations, 1), seed=0),
                                             "pbr", id_embedding, n, dev, **timing),
            }
            peaks[name] = _peak_mib(dev)
            del prior
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine()}
    mem = "max RSS" if dev.type == "cpu" else "max allocated"
    cases = {"geometry": f"grid {cfg.geometry.grid_resolution} @{cfg.render.resolution}px x{cfg.geometry.batch_size}",
             "texture": f"UV {cfg.texture.resolution}^2 @{cfg.render.resolution}px x{cfg.texture.batch_size}"}
    tiny_name = next(iter(measured))
    baseline = {s: sum(measured[tiny_name][s].values()) for s in ("geometry", "texture")}
    rows = []
    for name, stages in measured.items():
        for stage, parts in stages.items():
            for part, ms in list(parts.items()) + [("total", sum(parts.values()))]:
                case = f"{cases[stage]} {part}"
                if part == "total":
                    case += f" (peak {mem} {peaks[name]:.0f} MiB)"
                rows.append({"stage": f"{stage} SDS ({dev.type})", "case": case, "backend": name, "ms": ms,
                             "baseline": "tiny prior total", "ratio": ms / baseline[stage],
                             "peak_mib": peaks[name], **meta})
        per_it = {s: sum(p.values()) for s, p in stages.items()}
        for case, minutes, ref_min, ref in projections(per_it):
            rows.append({"stage": f"projection ({dev.type})", "case": case, "backend": name, "ms": minutes * 60000.0,
                         "baseline": ref, "ratio": minutes / ref_min, "peak_mib": peaks[name], **meta})
    return rows
