"""``idto3d bench geometry``: one geometry SDS iteration on CPU, split into its parts.

Parts: the field (transformer + marching tets), the normal-map render, the guidance call (encode, noise
prediction), backward through all of them, and the Adam step. Two guidances: ``OracleGuidance`` toward a
fixed target render (no network; the baseline) and the tiny random SD1.5-architecture prior through the
real diffusers path; and the oracle again under torch's default (not reproducible) kernels, for what the stages'
deterministic ones cost. Ratios are each row over the oracle's total from the same run.
"""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path

import torch

from idto3d.core.config import Config, TemplateConfig, load_config
from idto3d.geometry.expression_field import build_field
from idto3d.geometry.template import build_head_template
from idto3d.geometry.template_fit import fit_field_to_mesh
from idto3d.bench.steps import PARTS, time_geometry_step
from idto3d.stages.geometry_stage import render_for_guidance
from idto3d.priors.guidance import OracleGuidance, SDSGuidance
from idto3d.render.camera import orbit_camera

__all__ = ["PARTS", "bench_geometry"]


def _bench_config(quick: bool) -> Config:
    overrides = ["geometry.grid_resolution=24", "render.resolution=64", "prior.guidance.latent_size=8"] \
        if quick else []
    return load_config("preview", None, overrides)


_FIELD_CACHE: dict[tuple, dict] = {}


def _fitted_field(cfg: Config, device: torch.device | str | None = None):
    """The preset's field after a short template regression (so the timed surface is head-sized)."""
    field = build_field(cfg.geometry, n_expressions=len(cfg.expressions), seed=0, fast_paths=cfg.runtime.fast_paths,
                        device=device)
    key = (cfg.geometry.grid_resolution, type(field.encoding).__name__)
    if key not in _FIELD_CACHE:
        small = cfg.geometry.grid_resolution <= 32  # the --quick grid: a rougher, cheaper fit is enough
        fit = TemplateConfig(iterations=40 if small else 80, points_per_step=2000 if small else 4000)
        fit_field_to_mesh(field, build_head_template(32 if small else 64), fit, seed=0)
        _FIELD_CACHE[key] = {k: v.clone() for k, v in field.state_dict().items()}
    field.load_state_dict(_FIELD_CACHE[key])
    return field


def bench_geometry(repeats: int = 5, quick: bool = False) -> list[dict]:
    from idto3d.priors.prior import build_prior
    from idto3d.priors.tiny import make_tiny_base_model

    torch.manual_seed(0)
    cfg = _bench_config(quick)
    gcfg = cfg.prior.guidance
    res = cfg.render.resolution
    field = _fitted_field(cfg)
    with torch.no_grad():
        target = render_for_guidance(field(0), orbit_camera(10.0, 0.0, 3.0, 40.0), res)
    oracle_cfg = type(gcfg)(**{**gcfg.__dict__, "latent_mode": "downsample"})
    runs = {"oracle": (OracleGuidance(target, oracle_cfg, "geometry", cfg.geometry.iterations, seed=0), None)}
    with tempfile.TemporaryDirectory() as tmp:
        base = make_tiny_base_model(Path(tmp) / "sd", seed=0)
        prior = build_prior(base, "normal", 128, cfg.prior.adapter, seed=0)
        id_embedding = torch.nn.functional.normalize(torch.randn(128, generator=torch.Generator().manual_seed(0)),
                                                     dim=0)
        runs[f"tiny prior ({gcfg.latent_mode})"] = (
            SDSGuidance(prior, gcfg, "geometry", cfg.geometry.iterations, seed=0), id_embedding)
        measured = {name: time_geometry_step(cfg, _fitted_field(cfg), g, ident, repeats)
                    for name, (g, ident) in runs.items()}
        # What the stages' deterministic kernels cost (core.device.reproducible_kernels): the oracle's step again
        # under torch's defaults, whose sums' last bits follow thread timing with more than one thread.
        measured["oracle, default kernels"] = time_geometry_step(cfg, _fitted_field(cfg), runs["oracle"][0], None,
                                                                 repeats, reproducible=False)
    baseline = sum(measured["oracle"].values())
    case = f"grid {cfg.geometry.grid_resolution} @{res}px x{cfg.geometry.batch_size}"
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine()}
    rows = []
    for name, parts in measured.items():
        for part, ms in list(parts.items()) + [("total", sum(parts.values()))]:
            rows.append({"stage": "geometry SDS", "case": f"{case} {part}", "backend": name, "ms": ms,
                         "baseline": "oracle total", "ratio": ms / baseline, **meta})
    return rows
