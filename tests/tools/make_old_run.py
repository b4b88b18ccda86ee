"""Write ``tests/data/old_run/``: a run folder made by the code from before the re-arrangement into layers,
stopped part-way, so ``tests/test_run_folder_compat.py`` can prove that such a folder resumes with today's code.

Run it against the old code, from a folder outside the repository (so the installed package is not picked up):

    git worktree add --detach /tmp/old 237f6d8      # the last commit before the layers
    cd /tmp && PYTHONPATH=/tmp/old/src /work/main/.venv/bin/python \\
        /work/main/tests/tools/make_old_run.py /work/main/tests/data

The run is ``idto3d generate`` from an identity file (its photo is not at hand: no face fit) with tiny normal and
albedo priors built from a seeded random SD1.5-shaped base, settings cut to a few seconds, stopped after
``STOP_AFTER`` SDS iterations: the geometry stage finished (``geometry/done.json``, meshes) and the texture stage
stopped at a checkpoint (``texture/atlas.npz``, ``texture/ckpt.pt``). Nothing of the priors is written into
the run folder; the test rebuilds the same priors with today's code from the constants below, but for the tiny
base model's tokenizer: ``make_tiny_base_model`` trains its BPE vocabulary afresh, and two processes running the
same code get different ``vocab.json``/``merges.txt`` (the weights are the same), so the prompts would embed
differently. The run's tokenizer files are kept beside the run (``tests/data/old_run_tokenizer/``, 13 kB) and
the test puts them into the base it builds. The fields are
shrunk to a few kB and the grid to 8 cubes a side, and the two preview PNGs are deleted, so the folder is ~300 kB;
paths are spelled out here (not taken from ``core.run_layout``) because this is the old layout, written down.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

# The settings of the run (the test imports these, so both sides agree). Pinned to the CPU: the folder is made on
# one machine and resumed on another, and the comparison is bit for bit.
OVERRIDES = [
    "runtime.device=cpu", "expressions=[neutral, smile]",
    "template.iterations=100", "template.points_per_step=1000", "template.build_resolution=32",
    "geometry.grid_resolution=8", "render.resolution=64", "prior.guidance.latent_size=8",
    "geometry.iterations=6", "geometry.checkpoint_every=2", "geometry.preview_every=3",
    "texture.iterations=4", "texture.resolution=32", "texture.checkpoint_every=2", "texture.preview_every=1000",
    "export.texture_size=64", "export.turntable_views=2", "export.turntable_resolution=64", "export.video=false",
] + [f"{part}.{key}" for part in ("geometry", "texture") for key in (
    # Fields a few kB in size: the checkpoints (field + Adam's moments) stay small enough to check in.
    "encoding.n_levels=1", "encoding.n_features_per_level=2", "encoding.base_resolution=8",
    "encoding.max_resolution=8", "field.d_model=8", "field.n_layers=1", "field.n_heads=1", "field.latent_dim=4")]
RUN, TOKENIZER = "old_run", "old_run_tokenizer"  # the folders written under the output folder
MACHINE = "old_run_machine.json"  # beside them: the CPU's vector units (a bit-for-bit comparison needs the same)
TOKENIZER_FILES = ("vocab.json", "merges.txt")     # of the tiny base's tokenizer/ (the rest is deterministic)
PREVIEWS = ("geometry/init_preview.png", "geometry/progress.png")  # left out of the checked-in folder
STOP_AFTER = 8          # 6 geometry iterations (finished) + 2 texture iterations (a checkpoint), of 6 + 4
ID_DIM = 128            # the identity (dlib-sized) and the priors' ID branch
IDENTITY_SEED = 0
TINY_BASE_SEED = 0
PRIOR_SEED = 0
ADAPTER_RANK = 4        # self- and cross-attention LoRA rank of both priors


def identity_vector(torch):  # noqa: ANN001, ANN201 (torch is passed in: this module imports nothing at load)
    """The identity's unit embedding, the same on either side."""
    g = torch.Generator().manual_seed(IDENTITY_SEED)
    return torch.nn.functional.normalize(torch.randn(ID_DIM, generator=g), dim=0)


def main(data: Path) -> None:
    import torch

    import idto3d

    try:  # the old layout; today's code has idto3d.stages instead
        from idto3d.config import AdapterConfig, load_config
        from idto3d.identity.io import IdentityEmbedding, save_identity
        from idto3d.pipeline.generate import generate
        from idto3d.priors.model import build_prior, save_prior
        from idto3d.priors.tiny import make_tiny_base_model
    except ImportError:
        sys.exit(f"{idto3d.__file__} is not the pre-layers code: run with PYTHONPATH=<old worktree>/src from a "
                 f"folder outside the repository")
    out, tokenizer = data / RUN, data / TOKENIZER
    for folder in (out, tokenizer):
        if folder.exists():
            shutil.rmtree(folder)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = make_tiny_base_model(tmp / "sd", seed=TINY_BASE_SEED)
        tokenizer.mkdir(parents=True)
        for name in TOKENIZER_FILES:
            shutil.copyfile(base / "tokenizer" / name, tokenizer / name)
        adapter = AdapterConfig(self_attn_rank=ADAPTER_RANK, cross_attn_rank=ADAPTER_RANK)
        for domain in ("normal", "albedo"):
            save_prior(build_prior(base, domain, ID_DIM, adapter, seed=PRIOR_SEED), tmp / domain)
        emb = identity_vector(torch)
        ident = tmp / "id.safetensors"
        save_identity(ident, IdentityEmbedding(emb, emb[None].clone(), torch.ones(1, dtype=torch.bool),
                                               torch.tensor([[0., 0, 10, 10]]), torch.zeros(1, 5, 2), "dlib",
                                               photos=[{"path": "x.jpg", "quality": "ok"}]))
        result = generate([ident], out, load_config("preview", None, OVERRIDES), normal_prior=str(tmp / "normal"),
                          albedo_prior=str(tmp / "albedo"), progress=False, stop_after=STOP_AFTER)
    assert result.texture is not None and result.texture.iterations == STOP_AFTER - 6, result.missing
    # Previews are for people: no step reads them back, and they are a third of the folder's bytes.
    for preview in PREVIEWS:
        (out / preview).unlink()
    (data / MACHINE).write_text(json.dumps({"cpu_capability": torch.backends.cpu.get_cpu_capability()}) + "\n",
                                encoding="utf-8")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{idto3d.__file__}: wrote {out} ({size / 1024:.0f} KiB): {result.missing}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve())
