"""``idto3d bench texture``: one texture SDS iteration on CPU, split into its parts.

Parts: the field (baking the expression's UV textures), the pseudo-albedo render with its shading, the
guidance call, backward through all of them and the Adam step. Runs: the texture oracle in the diffuse and the
PBR sub-stage (no network; the diffuse one is the baseline) and the tiny random SD1.5-architecture albedo prior
through the real diffusers path. Ratios are each row over the baseline's total from the same run.
"""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path

import torch

from idto3d.core.config import Config, load_config
from idto3d.texture.uv_atlas import shared_atlas
from idto3d.geometry.template import build_head_template
from idto3d.bench.steps import time_texture_step
from idto3d.priors.texture_oracle import TexturedTarget, TextureOracleGuidance
from idto3d.stages.texture_stage import TexturedExpression
from idto3d.priors.guidance import SDSGuidance


def _bench_config(quick: bool) -> Config:
    overrides = ["texture.resolution=64", "render.resolution=64", "prior.guidance.latent_size=8",
                 "texture.encoding.max_resolution=32"] if quick else []
    return load_config("preview", None, overrides)


def bench_texture(repeats: int = 5, quick: bool = False) -> list[dict]:
    from idto3d.priors.prior import build_prior
    from idto3d.priors.tiny import make_tiny_base_model

    torch.manual_seed(0)
    cfg = _bench_config(quick)
    gcfg = cfg.prior.guidance
    mesh = build_head_template(32 if quick else 64)
    expr = TexturedExpression.from_atlas(shared_atlas([mesh])[0], cfg.texture.resolution)
    grey = torch.full((cfg.texture.resolution, cfg.texture.resolution, 1), 0.5)
    target = TexturedTarget(expr.mesh, expr.uv, expr.attribute_faces, grey.expand(-1, -1, 3), grey, grey * 0)
    oracle_cfg = type(gcfg)(**{**gcfg.__dict__, "latent_mode": "downsample"})
    total = max(cfg.texture.iterations, 1)
    runs = {"oracle, diffuse": (TextureOracleGuidance([target], oracle_cfg, total_steps=total), "diffuse", None),
            "oracle, pbr": (TextureOracleGuidance([target], oracle_cfg, total_steps=total), "pbr", None)}
    with tempfile.TemporaryDirectory() as tmp:
        base = make_tiny_base_model(Path(tmp) / "sd", seed=0)
        prior = build_prior(base, "albedo", 128, cfg.prior.adapter, seed=0)
        id_embedding = torch.nn.functional.normalize(torch.randn(128, generator=torch.Generator().manual_seed(0)),
                                                     dim=0)
        runs[f"tiny prior ({gcfg.latent_mode}), pbr"] = (SDSGuidance(prior, gcfg, "texture_pbr", total, seed=0),
                                                         "pbr", id_embedding)
        measured = {name: time_texture_step(cfg, expr, g, shading, ident, repeats)
                    for name, (g, shading, ident) in runs.items()}
    baseline = sum(measured["oracle, diffuse"].values())
    case = (f"{int(mesh.faces.shape[0])} faces, UV {cfg.texture.resolution}^2 @{cfg.render.resolution}px "
            f"x{cfg.texture.batch_size}")
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine()}
    rows = []
    for name, parts in measured.items():
        for part, ms in list(parts.items()) + [("total", sum(parts.values()))]:
            rows.append({"stage": "texture SDS", "case": f"{case} {part}", "backend": name, "ms": ms,
                         "baseline": "oracle diffuse total", "ratio": ms / baseline, **meta})
    return rows
