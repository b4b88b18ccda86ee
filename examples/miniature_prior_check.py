"""Is the miniature prior a denoiser, and does its conditioning act? (README "Miniature experiment"). Usage:

    python examples/miniature_prior_check.py WORK   # reads WORK/prior, WORK/base, WORK/data, WORK/ids; writes WORK/prior_check.json

- **Denoising loss at fixed timesteps**: L_simple on every training image with fixed noise, for the trained prior
  and for the untrained base (fresh adapters over the base it started from), in the prior's own latent space.
- **Samples look like the data**: DDIM samples (one per training subject, its prompt, identity and expression):
  RMSE of each sample to the nearest training image and to the mean training image (both in the prior's
  latent image space, [0, 1]); a sample of noise is far from both, a memorised or generalising one near the first.
- **Conditioning acts**: RMSE between samples from the same initial noise for two identities (ID branch on, and
  off), for the same identity from other noise, and ID on vs off from the same noise; at CFG 1 and 3.
- **Held-out subjects** (when WORK/data_heldout exists: ``render-dataset`` of the held-out scans with their
  identities and the training cameras): the same denoising loss on their images, with the ID branch on and off,
  and on the training images with it off. A prior that memorised its subjects denoises held-out ones worse; one
  whose ID branch generalises denoises them better with it on (README run 9).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from idto3d.identity.io import load_identity
from idto3d.priors.prior import build_prior, load_prior
from idto3d.priors.sampling import SampleSpec, ddim_samples
from idto3d.priors.training.dataset import PriorDataset
from idto3d.priors.training.objective import training_latents

TIMESTEPS = (50, 200, 500, 800)


def _data(prior, folder: Path) -> tuple[dict, torch.Tensor]:
    ds = PriorDataset(folder, "normal", 64, id_dim=prior.spec.id_dim)
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    return batch, training_latents(prior, batch["image"])


@torch.no_grad()
def denoising_losses(prior, batch: dict, z0: torch.Tensor) -> dict[int, float]:
    text = prior.encode_text(list(batch["prompt"]))
    exp = prior.encode_expressions(list(batch["expression"]))
    out = {}
    for t in TIMESTEPS:
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(t))
        tt = torch.full((len(z0),), t, dtype=torch.long)
        noisy = prior.noise_scheduler.add_noise(z0, noise, tt)
        pred = prior.predict_noise(noisy, tt, text, id_embedding=batch["id_embedding"], exp_embedding=exp,
                                   lambda_id=batch["has_id"].float(), lambda_exp=1.0)
        out[t] = float(torch.nn.functional.mse_loss(pred, noise))
    return out


def _id_off(batch: dict) -> dict:
    return {**batch, "has_id": torch.zeros_like(batch["has_id"])}


def generalisation(prior, batch: dict, z0: torch.Tensor, heldout: Path) -> dict:
    """Denoising loss on the held-out subjects' images (ID branch on / off) next to the training images' (off)."""
    h_batch, h_z0 = _data(prior, heldout)
    return {"heldout": denoising_losses(prior, h_batch, h_z0),
            "heldout_id_off": denoising_losses(prior, _id_off(h_batch), h_z0),
            "train_id_off": denoising_losses(prior, _id_off(batch), z0), "heldout_images": len(h_z0)}


def _rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise RMSE ``[len(a), len(b)]`` between image stacks."""
    return torch.cdist(a.flatten(1), b.flatten(1)) / a[0].numel() ** 0.5


def _specs(batch: dict, ids: dict[str, torch.Tensor]) -> list[SampleSpec]:
    """Per identity, its first training record's prompt and expression, with the subject's embedding."""
    specs = []
    for emb in ids.values():
        k = next(i for i, p in enumerate(batch["id_embedding"]) if torch.allclose(p, emb))
        specs.append(SampleSpec(batch["prompt"][k], emb, batch["expression"][k]))
    return specs


def _same_noise(prior, specs: list[SampleSpec], cfg: float, lambda_id: float = 1.0) -> torch.Tensor:
    """One sample per spec, all from the same initial noise (sample ``i`` of ``ddim_samples`` draws its own)."""
    return torch.cat([ddim_samples(prior, [sp], guidance_scale=cfg, seed=0, lambda_id=lambda_id) for sp in specs])


def sample_checks(prior, batch: dict, z0: torch.Tensor, work: Path) -> dict:
    ids = {p.stem: load_identity(p).embedding.float() for p in sorted((work / "ids").glob("*.safetensors"))}
    specs = _specs(batch, ids)
    data = ((z0[:, :3] + 1) / 2).permute(0, 2, 3, 1)  # [N, h, w, 3] in [0, 1], as ddim_samples returns
    mean = data.mean(0, keepdim=True)
    out: dict = {"training_images_between_subjects": _offdiag_mean(_rmse(data, data))}
    for cfg in (1.0, 3.0):
        s = _same_noise(prior, specs, cfg)
        d = _rmse(s, data)
        other_seed = ddim_samples(prior, specs, guidance_scale=cfg, seed=1)  # other noise for every sample
        no_id = _same_noise(prior, specs, cfg, lambda_id=0.0)
        out[f"cfg{cfg:g}"] = {
            "to_nearest_training_image": float(d.min(1).values.mean()),
            "to_mean_image": float(_rmse(s, mean).mean()),
            "nearest_is_own_subject": float(sum(torch.allclose(batch["id_embedding"][int(j)], sp.id_embedding)
                                                for j, sp in zip(d.argmin(1), specs)) / len(specs)),
            # same noise, other identity (and its prompt / expression) vs same conditions, other noise
            "between_identities_same_noise": _offdiag_mean(_rmse(s, s)),
            "between_identities_same_noise_id_off": _offdiag_mean(_rmse(no_id, no_id)),
            "same_identity_other_noise": float((s - other_seed).square().mean((1, 2, 3)).sqrt().mean()),
            "id_on_vs_off_same_noise": float((s - no_id).square().mean((1, 2, 3)).sqrt().mean())}
    return out


def _offdiag_mean(d: torch.Tensor) -> float:
    n = len(d)
    return float((d.sum() - d.diagonal().sum()) / max(n * (n - 1), 1))


def main(work: Path) -> dict:
    torch.set_num_threads(1)
    prior = load_prior(work / "prior")
    batch, z0 = _data(prior, work / "data")
    base = build_prior(work / "base", "normal", prior.spec.id_dim)
    base.spec = dataclasses.replace(base.spec, latents=prior.spec.latents)
    out = {"denoising_loss": {"trained": denoising_losses(prior, batch, z0),
                              "untrained_base": denoising_losses(base, batch, z0)},
           "samples": sample_checks(prior, batch, z0, work), "images": len(z0)}
    if (work / "data_heldout").is_dir():
        out["generalisation"] = generalisation(prior, batch, z0, work / "data_heldout")
    (work / "prior_check.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=1))
