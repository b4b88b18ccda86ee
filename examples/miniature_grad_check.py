"""Does the learned prior's SDS gradient point toward the subject? (README "Miniature experiment").

SDS moves the surface along g = w(t) (eps_hat(z_t) - eps). With the oracle (the exact score of the subject's
ground truth, priors/mesh_oracle.py) that is d = w(t) sqrt(abar / (1 - abar)) (z - z*): straight toward the
subject's renders. This script renders the SDS start (the generic template) and the subject's ground truth from
cameras drawn from the config's ``render.camera``, averages the prior's g over several noise draws per view and
timestep (the mean step SDS takes there), and splits it into its part along the oracle's d and the rest:

- ``along``: <g, d> / |d|^2 (1 = the oracle's step toward the subject; 0 = none; < 0 = away from it),
- ``across``: |g - along d| / |d|, the part that moves the surface elsewhere (the prior's error, seen by SDS),
- ``cos``: cosine of g and d.

Needs no SDS run, so each setting (camera, latent size, CFG, lambda_id) is measured in seconds. ``--start MESH``
measures from another surface than the template: an SDS result (``WORK/runs/V/S/geometry/neutral.ply``: does the
prior still point at the subject once the surface has moved?) or ``truth`` (the subject's own scan: a prior that
knows the subject leaves it where it is). ``--delta id`` measures only what the ID tokens add: the mean of
eps_hat(ID on) - eps_hat(ID off) over the same noises (does the identity conditioning point at the subject,
whatever error the rest of the prior carries?). Every row also gives ``step``, |g| in units of |d0|, the oracle's step
from the template, so steps from different starts compare; from ``truth`` d = 0, so along / across / cos are
measured against d0 (along < 0: the prior pushes the truth back toward the template).

``--expression E`` makes the subject's scan in expression E the target and conditions the prior on E, as SDS does
for that expression's mesh. ``--start truth:neutral`` then starts from the subject's neutral scan, so d is exactly
the expression's own change, rendered from the same cameras; ``--delta expression`` keeps only what the expression
condition adds (eps_hat(E) - eps_hat(neutral) over the same noises): does asking for E point from neutral toward E,
and how far? Usage:

    python examples/miniature_grad_check.py WORK SUBJECT [--prior WORK/prior] [--expression E]
        [--start MESH|truth|truth:EXPR] [--delta id|expression] [--set k=v ...]

SUBJECT's identity is read from WORK/ids or WORK/ids_heldout; prints one JSON row per timestep.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import torch

from idto3d.core.config import load_config
from idto3d.core.expressions import EXPRESSION_NAMES
from idto3d.geometry.mesh_io import load_mesh
from idto3d.identity.io import load_identity
from idto3d.priors.guidance import GuidanceCond, SDSGuidance
from idto3d.priors.prior import load_prior
from idto3d.render.camera import sample_orbit_cameras
from idto3d.stages.geometry_stage import geometry_prompts, render_for_guidance, stage_conventions
from idto3d.stages.initial_geometry import resolve_template

EXPERIMENT = ["face_model.enabled=false", "expressions=[neutral]"]


def _identity(work: Path, subject: str) -> torch.Tensor:
    for folder in ("ids", "ids_heldout"):
        if (work / folder / f"{subject}.safetensors").is_file():
            return load_identity(work / folder / f"{subject}.safetensors").embedding
    raise SystemExit(f"error: no identity {subject} under {work}/ids or {work}/ids_heldout")


@torch.no_grad()
def mean_steps(guidance: SDSGuidance, z: torch.Tensor, t: int, cond: GuidanceCond, draws: int,
               gen: torch.Generator) -> torch.Tensor:
    """The prior's SDS gradient direction eps_hat - eps at ``t``, averaged over ``draws`` noises (w(t) dropped:
    it scales g and d alike)."""
    abar = float(guidance.alphas_cumprod[t])
    total = torch.zeros_like(z)
    for _ in range(draws):
        eps = torch.randn(z.shape, generator=gen)
        z_t = math.sqrt(abar) * z + math.sqrt(1 - abar) * eps
        total += guidance.predict_noise(z_t, t, cond).float() - eps
    return total / draws


def split(g: torch.Tensor, d: torch.Tensor, d0: torch.Tensor | None = None) -> dict:
    """Per view: g's part along d (in units of d), the rest's norm (in |d|), cosine, and |g| in units of |d0|
    (default d); averaged over views."""
    g, d = g.flatten(1).double(), d.flatten(1).double()
    d0 = d if d0 is None else d0.flatten(1).double()
    dd = (d * d).sum(1)
    along = (g * d).sum(1) / dd
    across = (g - along[:, None] * d).norm(dim=1) / dd.sqrt()
    cos = (g * d).sum(1) / (g.norm(dim=1) * dd.sqrt())
    step = g.norm(dim=1) / d0.norm(dim=1)
    return {"along": float(along.mean()), "across": float(across.mean()), "cos": float(cos.mean()),
            "step": float(step.mean())}


def start_mesh(cfg, start: str | None, truth, scans=None):
    """The surface the steps are measured from: the generic template (SDS's start), the truth, the subject's scan
    in another expression (``truth:EXPR``, through ``scans(EXPR)``), or a mesh file."""
    if start in (None, "template"):
        return resolve_template(cfg)
    if start == "truth":
        return truth
    if start.startswith("truth:") and scans is not None:
        return scans(start.removeprefix("truth:"))
    if not Path(start).is_file():
        raise SystemExit(f"error: --start {start}: no such mesh file (or 'truth')")
    return load_mesh(start)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("subject")
    ap.add_argument("--prior", type=Path, default=None, help="default: WORK/prior")
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--timesteps", default="100,300,500")
    ap.add_argument("--prompt", default="a person", help="the subject text, as generate's --prompt")
    ap.add_argument("--start", default=None,
                    help="a mesh file, 'truth' or 'truth:EXPR' (default: the generic template)")
    ap.add_argument("--expression", default="neutral", choices=EXPRESSION_NAMES,
                    help="the target scan's expression and the prior's condition")
    ap.add_argument("--delta", choices=("id", "expression"), default=None,
                    help="only the ID tokens' (or the expression condition's) part of the step")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    cfg = load_config("miniature", overrides=EXPERIMENT + args.overrides)
    prior = load_prior(args.prior or args.work / "prior", base_model=cfg.prior.base_model, prefer_recorded=True)
    guidance = SDSGuidance(prior, cfg.prior.guidance)
    from miniature_oracle import subject_scans  # the examples folder is on sys.path when run as a script

    if args.delta == "expression" and args.expression == "neutral":
        raise SystemExit("error: --delta expression needs --expression other than neutral")

    def scans(expression: str):
        if expression not in EXPRESSION_NAMES:
            raise SystemExit(f"error: --start truth:{expression}: not an expression")
        return subject_scans(args.work, args.subject, [expression])[0]

    truth = scans(args.expression)
    gen = torch.Generator().manual_seed(cfg.seed)
    cam = cfg.render.camera
    cams = sample_orbit_cameras(args.views, cam.elevation_deg, cam.azimuth_deg, cam.radius, cam.fov_deg,
                                generator=gen, target=cam.target)
    conv = stage_conventions(guidance)
    def encode(mesh):
        return guidance.encode(render_for_guidance(mesh, cams, cfg.render.resolution, None, conv))

    z0 = encode(resolve_template(cfg))
    z = z0 if args.start in (None, "template") else encode(start_mesh(cfg, args.start, truth, scans))
    # The oracle's z*: the ground truth rendered exactly as the SDS start is (priors/mesh_oracle.py)
    z_star = encode(truth)
    cond = GuidanceCond(prompts=geometry_prompts(cams, args.prompt, conv), negative_prompt=conv.negative_prompt,
                        id_embedding=_identity(args.work, args.subject), expressions=[args.expression] * len(cams))
    off, off_cond = guidance, cond
    if args.delta == "id":
        off = SDSGuidance(prior, dataclasses.replace(cfg.prior.guidance, lambda_id=0.0))
    elif args.delta == "expression":
        off_cond = dataclasses.replace(cond, expressions=["neutral"] * len(cams))

    def step(t: int) -> torch.Tensor:
        if args.delta is None:
            return mean_steps(guidance, z, t, cond, args.draws, gen)
        state = gen.get_state()  # the same noises for both halves: their difference is the condition's alone
        on = mean_steps(guidance, z, t, cond, args.draws, gen)
        return on - mean_steps(off, z, t, off_cond, args.draws, torch.Generator().set_state(state))

    rows = []
    for t in (int(x) for x in args.timesteps.split(",")):
        abar = float(guidance.alphas_cumprod[t])
        scale = math.sqrt(abar / (1 - abar))
        d0 = scale * (z0 - z_star)
        d = d0 if args.start == "truth" else scale * (z - z_star)
        row = {"t": t, "start": args.start or "template", "expression": args.expression, "delta": args.delta,
               "cfg": cfg.prior.guidance.guidance_scale, "lambda_id": cfg.prior.guidance.lambda_id, "latent_size": guidance.config.latent_size,
               "d_rms": float((scale * (z - z_star)).square().mean().sqrt()),
               **split(step(t), d, d0)}
        print(json.dumps(row))
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
