"""How big is the identity / expression signal the prior is asked to learn (README "Miniature experiment")?
Renders the train subjects' scans from fixed cameras made from the config's camera (``render.camera``: the middle
of its radius and fov ranges, its ``target``), as the prior sees them (``downsample_latents`` at each latent
size, image units), and reports RMSEs: two subjects from the same camera, one subject from cameras 30 degrees
apart, neutral vs mouth_open of one subject. Measure this before spending CPU on training. Usage:

    python examples/miniature_signal.py WORK [--sizes 16,32] [--set render.camera.fov_deg=[18,22] ...]

Writes nothing; prints one JSON object per latent size (and a strip of the front renders to --png if given).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from idto3d.core.config import load_config
from idto3d.core.expressions import EXPRESSION_NAMES
from idto3d.geometry.mesh_io import load_mesh
from idto3d.priors.guidance import downsample_latents
from idto3d.render.camera import orbit_camera
from idto3d.render.normals import render_normal_map
from idto3d.render.preview import save_png


def _mid(rng) -> float:
    return 0.5 * (float(rng[0]) + float(rng[1]))


def renders(work: Path, cfg, expression: str, azimuths: list[float]) -> torch.Tensor:
    """``[S, len(azimuths), 4, H, W]``: normal maps + coverage of every train subject in ``expression``."""
    cam = cfg.render.camera
    elev = min(max(10.0, cam.elevation_deg[0]), cam.elevation_deg[1])
    cams = orbit_camera(elev, azimuths, _mid(cam.radius), _mid(cam.fov_deg), target=cam.target)
    out = []
    for scan in sorted((work / "scans").glob(f"[0-9][0-9][0-9]/{EXPRESSION_NAMES.index(expression):03d}/scan.ply")):
        o = render_normal_map(load_mesh(scan), cams, cfg.render.resolution)
        out.append(torch.cat([o.image, o.mask], -1).permute(0, 3, 1, 2))
    return torch.stack(out)


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).square().mean().sqrt())


def signal(neutral: torch.Tensor, other: torch.Tensor, size: int) -> dict:
    """RMSEs (normal channels, image units [0, 1]) at ``size`` latents."""
    def lat(x: torch.Tensor) -> torch.Tensor:
        return downsample_latents(x.flatten(0, 1), size)[:, :3].unflatten(0, x.shape[:2]) / 2
    n, o = lat(neutral), lat(other)
    pairs = list(itertools.combinations(range(n.shape[0]), 2))
    between = [_rmse(n[a, 0], n[b, 0]) for a, b in pairs]
    return {"latent_size": size, "subject_vs_subject": float(np.mean(between)), "subject_vs_subject_min": min(between),
            "view_30deg": float(np.mean([_rmse(n[s, 0], n[s, 1]) for s in range(n.shape[0])])),
            "neutral_vs_mouth_open": float(np.mean([_rmse(n[s, 0], o[s, 0]) for s in range(n.shape[0])]))}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--sizes", default="16,32")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args(argv)
    cfg = load_config("miniature", overrides=args.overrides)
    neutral = renders(args.work, cfg, "neutral", [0.0, 30.0])
    other = renders(args.work, cfg, "mouth_open", [0.0])
    if args.png is not None:
        strip = torch.cat(list(neutral[:, 0, :3].permute(0, 2, 3, 1)), dim=1)
        save_png((strip.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy(), args.png)
    rows = [signal(neutral, other, int(s)) for s in args.sizes.split(",")]
    for row in rows:
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
