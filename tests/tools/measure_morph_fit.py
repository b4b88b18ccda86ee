"""Measure the morph fit on the SDS path with the tiny normal prior: generate neutral, smile, mouth_open and
print export/morph/morph_fit.json. Usage: python tests/tools/measure_morph_fit.py OUT_DIR GRID ITERATIONS."""
import os
import sys
import time
from pathlib import Path

import torch
from typer.testing import CliRunner

from idto3d.cli import app
from idto3d.core.config import AdapterConfig
from idto3d.identity.io import IdentityEmbedding, save_identity
from idto3d.priors.prior import build_prior, save_prior
from idto3d.priors.tiny import make_tiny_base_model

tmp = Path(sys.argv[1]); grid = sys.argv[2]; iters = sys.argv[3]
os.environ["IDTO3D_CACHE"] = str(tmp / "cache")
base = make_tiny_base_model(tmp / "sd", seed=0)
prior = tmp / "normal"
save_prior(build_prior(base, "normal", 128, AdapterConfig(self_attn_rank=4, cross_attn_rank=4), seed=0), prior)
emb = torch.nn.functional.normalize(torch.randn(128, generator=torch.Generator().manual_seed(0)), dim=0)
ident = tmp / "id.safetensors"
save_identity(ident, IdentityEmbedding(emb, emb[None].clone(), torch.ones(1, dtype=torch.bool),
              torch.tensor([[0., 0, 10, 10]]), torch.zeros(1, 5, 2), "dlib", photos=[{"path": "x.jpg", "quality": "ok"}]))
FAST = ["template.iterations=100", "template.points_per_step=1000", "template.build_resolution=32",
        f"geometry.grid_resolution={grid}", "render.resolution=64", "prior.guidance.latent_size=8",
        f"geometry.iterations={iters}", "geometry.checkpoint_every=100", "geometry.preview_every=100",
        "export.turntable_views=2", "export.turntable_resolution=64", "export.video=false", "export.texture_size=64"]
t = time.time()
r = CliRunner().invoke(app, ["generate", str(ident), "--out", str(tmp / "run"), "--normal-prior", str(prior),
                             "--expressions", "neutral,smile,mouth_open", *[a for x in FAST for a in ("--set", x)]])
print(r.exit_code, r.output[-600:])
print("seconds", round(time.time() - t, 1))
print((tmp / "run/export/morph/morph_fit.json").read_text())
