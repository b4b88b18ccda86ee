"""Identity of synthetic subjects: a face recogniser looking at renders of each subject's neutral head.

As in the paper, a subject's ID embedding comes from photos of them: here, shaded renders of the synthetic
neutral scan (vertex colours under one soft key light, frontal and near-frontal views) go through the identity
pipeline (``identity.extract.compute_identity``, the configured backend; dlib offline). ``separation`` measures
whether the recogniser tells the subjects apart: each view's distance to its own subject's mean embedding against
the distances between subjects' means.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from idto3d.core.config import Config

# (elevation, azimuth) of the portrait views, degrees: frontal and near-frontal as a user's photos would be.
PORTRAIT_VIEWS = ((0.0, 0.0), (0.0, -15.0), (0.0, 15.0), (10.0, 0.0), (-8.0, 8.0))
PORTRAIT_RADIUS, PORTRAIT_FOV = 2.4, 28.0
_KEY_LIGHT = torch.tensor([-0.3, 0.4, 1.0])


def render_portraits(scan: Path, resolution: int = 256) -> list[np.ndarray]:
    """Shaded colour renders ``[H, W, 3] uint8`` of a scan (loaded as render-dataset loads it), one per view."""
    from idto3d.priors.training.scans import load_scan
    from idto3d.render.albedo import render_albedo
    from idto3d.render.camera import orbit_camera
    from idto3d.render.mesh import Mesh
    from idto3d.render.normals import render_normal_map

    surface = load_scan(scan)
    mesh = Mesh(surface.vertices, surface.faces)
    elev, azim = (torch.tensor(v) for v in zip(*PORTRAIT_VIEWS))
    cams = orbit_camera(elev, azim, PORTRAIT_RADIUS, PORTRAIT_FOV)
    with torch.no_grad():
        normals = render_normal_map(mesh, cams, resolution)
        albedo = render_albedo(mesh, cams, resolution, surface.vertex_colors,
                               attribute_faces=surface.attribute_faces).image
    light = _KEY_LIGHT / _KEY_LIGHT.norm()
    shade = 0.25 + 0.75 * (normals.normals @ light).clamp(min=0)[..., None]
    image = albedo * shade * normals.mask + (1 - normals.mask)  # on white, as a portrait backdrop
    return [(im.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy() for im in image]


def subject_identity(scans: Path, subject: str, out_dir: Path, cfg: Config, resolution: int = 256):
    """Render subject ``subject``'s neutral scan, embed the renders, write ``out_dir/<subject>.safetensors``."""
    from idto3d.core.expressions import EXPRESSION_NAMES
    from idto3d.identity.extract import compute_identity
    from idto3d.render.preview import save_png

    scan = scans / subject / f"{EXPRESSION_NAMES.index('neutral'):03d}" / "scan.ply"
    photos = []
    for k, image in enumerate(render_portraits(scan, resolution)):
        photos.append(save_png(image, out_dir / "portraits" / f"{subject}_{k}.png"))
    return compute_identity(photos, out_dir / f"{subject}.safetensors", cfg, show_progress=False,
                            drop_outliers=False)


@dataclass
class Separation:
    within: float          # mean distance of a subject's views to its own mean embedding
    within_max: float
    between: float         # mean distance between two subjects' mean embeddings
    between_min: float
    nearest_correct: float  # fraction of views whose nearest subject mean (own mean left out) is their own

    @property
    def separates(self) -> bool:
        return self.between_min > self.within_max and self.nearest_correct == 1.0


def separation(embeddings: dict[str, np.ndarray]) -> Separation:
    """From per-view L2-normalised embeddings ``{subject: [N, D]}`` (N >= 2 each)."""
    names = sorted(embeddings)
    means = {s: _unit(embeddings[s].mean(0)) for s in names}
    within = np.concatenate([np.linalg.norm(embeddings[s] - means[s], axis=1) for s in names])
    between = np.array([np.linalg.norm(means[a] - means[b]) for i, a in enumerate(names) for b in names[i + 1:]])
    correct = total = 0
    for s in names:
        e = embeddings[s]
        for k in range(len(e)):
            own = _unit(np.delete(e, k, axis=0).mean(0))  # leave the view out of its own subject's mean
            dists = {t: np.linalg.norm(e[k] - (own if t == s else means[t])) for t in names}
            correct += min(dists, key=dists.get) == s
            total += 1
    return Separation(float(within.mean()), float(within.max()), float(between.mean()), float(between.min()),
                      correct / total)


def synth_identities(scans: str | Path, out: str | Path, cfg: Config, *, backend: str = "dlib",
                     resolution: int = 256, update=None) -> Separation | None:
    """``out/<subject>.safetensors`` for every subject in ``scans`` (render-dataset's ``--identities`` folder).

    ``backend`` ``dlib``/``arcface``: the recogniser on portraits of the subject; the separation of the subjects
    is measured and written to ``out/separation.json``. ``synthetic``: ``synthetic_identity`` of the ground-truth
    shape code in ``synth.json``. Subjects whose file exists are skipped (their embeddings are read back).
    """
    import json
    from dataclasses import asdict

    from idto3d.core.atomic import atomic_write_text
    from idto3d.core.errors import IdtoError
    from idto3d.identity.io import load_identity, save_identity
    from idto3d.stages.synth_scans import shape_codes

    scans, out = Path(scans), Path(out)
    codes = shape_codes(scans)
    if not codes:
        raise IdtoError(f"{scans} has no synth.json listing subjects; make it with `idto3d synth-scans`")
    if backend not in ("dlib", "arcface", "synthetic"):
        raise IdtoError(f"unknown identity backend {backend!r}; choose dlib, arcface or synthetic")
    cfg.identity.backend = backend if backend != "synthetic" else cfg.identity.backend
    views = {}
    for subject in sorted(codes):
        path = out / f"{subject}.safetensors"
        if path.is_file():
            ident = load_identity(path)
        elif backend == "synthetic":
            ident = synthetic_identity(codes[subject])
            save_identity(path, ident)
        else:
            ident = subject_identity(scans, subject, out, cfg, resolution)
        if ident.backend != backend:
            raise IdtoError(f"{path} was made with the {ident.backend} backend, not {backend}; use a new folder")
        views[subject] = ident.embeddings.numpy()
        if update is not None:
            update()
    if backend == "synthetic" or len(views) < 2:
        return None
    sep = separation(views)
    atomic_write_text(out / "separation.json", json.dumps({**asdict(sep), "separates": sep.separates,
                                                           "backend": backend}, indent=2) + "\n")
    return sep


SYNTHETIC_PROJECTION_SEED = 20210  # fixed: the projection is part of the option's definition, not of a run


def synthetic_identity(shape: torch.Tensor, dim: int = 128):
    """The documented fallback when the recogniser cannot tell synthetic subjects apart: the subject's shape
    code through one fixed Gaussian projection to ``dim`` values, L2-normalised (backend ``synthetic``).
    Deterministic; nearby shapes get nearby embeddings, as a recogniser's would."""
    from idto3d.identity.io import IdentityEmbedding

    gen = torch.Generator().manual_seed(SYNTHETIC_PROJECTION_SEED)
    proj = torch.randn(dim, shape.numel(), generator=gen) / dim ** 0.5
    emb = proj @ shape.float()
    emb = emb / emb.norm()
    return IdentityEmbedding(embedding=emb, embeddings=emb[None].clone(), used=torch.ones(1, dtype=torch.bool),
                             boxes=torch.zeros(1, 4), landmarks=torch.zeros(1, 5, 2), backend="synthetic",
                             photos=[{"path": "", "source": "synthetic shape code"}],
                             recogniser={"model": "synthetic-shape-projection", "sha256": f"seed{SYNTHETIC_PROJECTION_SEED}"})


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x)


__all__ = ["PORTRAIT_VIEWS", "Separation", "render_portraits", "separation", "subject_identity", "synth_identities",
           "synthetic_identity"]
