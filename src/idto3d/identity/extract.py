"""Photos -> chosen faces -> aligned crops -> per-photo embeddings -> one identity (paper section 3.2).

The paper conditions on the mean ArcFace embedding of 1-5 photos (more photos average out
pose, lighting and expression; appendix A). Per-photo quality flags tell the user which
photos to replace: ``small face``, ``blurry``, ``several faces``, ``outlier`` (far from the
others' mean: probably someone else) and ``may not be the same person`` (two photos that disagree).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from rich.console import Console
from skimage.color import rgb2gray
from skimage.filters import laplace

from idto3d.core.atomic import atomic_write
from idto3d.core.errors import IdtoError
from idto3d.identity.face_backend import AlignedFace, FaceBackend
from idto3d.identity.embedder import identity_distance, l2_normalise, make_backend
from idto3d.identity.faces import Face, choose_face, count_confident, sort_by_size
from idto3d.identity.io import IdentityEmbedding, save_identity
from idto3d.identity.outliers import OutlierReport, find_outliers
from idto3d.identity.photos import PAPER_MAX_PHOTOS, collect_photos, load_photo, probe_photo


def sharpness(crop112: np.ndarray) -> float:
    """Contrast-normalised Laplacian variance of the inner face region of a 112 px ArcFace crop.

    Dividing by the grey variance makes it insensitive to exposure (a darkened photo is not
    blurrier); the inner window skips the black border a warp leaves near the photo's edge.
    Measured on the bundled photos: 9-30 as shipped, ~2-5 after a 1 px Gaussian blur, ~1 after 2 px.
    """
    g = rgb2gray(crop112)[24:104, 20:92]
    var = float(g.var())
    return float(laplace(g).var() / var * 100.0) if var > 1e-8 else 0.0


def default_crops_dir(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    return out_path.parent / f"{out_path.stem}_crops"


def _save_png(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda p: Image.fromarray(array).save(p, format="PNG"))


def _faces_overview(image: np.ndarray, faces: list, path: Path) -> None:
    """The photo with numbered boxes, so the user can pick ``--face-index``."""
    im = Image.fromarray(image)
    scale = min(1.0, 1024 / max(im.size))
    if scale < 1.0:
        im = im.resize((round(im.width * scale), round(im.height * scale)))
    draw = ImageDraw.Draw(im)
    for k, f in enumerate(faces):
        b = [float(v) * scale for v in f.box]
        draw.rectangle(b, outline=(255, 40, 40), width=3)
        draw.text((b[0] + 4, b[1] + 2), str(k), fill=(255, 255, 0))
    atomic_write(path, lambda p: im.save(p, format="JPEG", quality=90))


def _rel(path: Path, base: Path | None) -> str:
    if base is None:
        return str(path)
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()


@dataclass
class _Embedded:
    """One photo's chosen face, its embedding and what its crop files need."""

    path: Path
    group_image: np.ndarray | None  # the photo, kept only when it shows several faces (for the overview)
    faces: list
    aligned: AlignedFace
    face: Face
    embedding: np.ndarray
    record: dict


def _quality_flags(face_size: float, sharp: float, n_confident: int, cfg) -> list[str]:
    flags = []
    if face_size < cfg.min_face_size:
        flags.append("small face")
    if sharp < cfg.blur_threshold:
        flags.append("blurry")
    if n_confident > 1:
        flags.append("several faces")
    return flags


def _embed_photo(path: Path, backend: FaceBackend, face_index: int | None, cfg, say: Callable[[str], None]
                 ) -> _Embedded:
    image = load_photo(path)
    faces = sort_by_size(backend.detect(image), backend.confident_score)
    choice = choose_face(faces, face_index, str(path), backend.confident_score)
    if choice.note:
        say(f"[yellow]note:[/] {choice.note}")
    aligned = backend.align(image, choice.face)
    embedding = l2_normalise(backend.embed(aligned))
    n_conf = count_confident(faces, backend.confident_score)
    sharp = sharpness(aligned.arcface_crop)
    record = {"path": str(path.resolve()), "face_index": choice.index, "n_faces": len(faces),
              "n_confident_faces": n_conf, "score": round(choice.face.score, 4),
              "face_size": round(choice.face.size, 1), "sharpness": round(sharp, 2),
              "image_size": [int(image.shape[1]), int(image.shape[0])],
              "flags": _quality_flags(choice.face.size, sharp, n_conf, cfg), "ambiguous_choice": choice.ambiguous}
    return _Embedded(path, image if len(faces) > 1 else None, faces, aligned, choice.face, embedding, record)


def _embed_photos(paths: list[Path], backend: FaceBackend, face_index: int | None, cfg, say: Callable[[str], None],
                  console: Console | None, show_progress: bool) -> list[_Embedded]:
    from idto3d.core.progress import progress_bar

    done = []
    with progress_bar("identity", total=len(paths), console=console, enabled=show_progress) as update:
        for path in paths:
            done.append(_embed_photo(path, backend, face_index, cfg, say))
            update()
    return done


def _mark_outliers(records: list[dict], report: OutlierReport, threshold: float, drop: bool,
                   say: Callable[[str], None]) -> np.ndarray:
    """Flag disagreeing photos in ``records``, warn, and return which photos the mean uses."""
    used = np.ones(len(records), dtype=bool)
    if report.pair_mismatch:
        say(f"[yellow]warning:[/] these two photos may not show the same person (identity distance "
            f"{report.loo_distance[0]:.3f} > {threshold:.3f}); with two photos neither can be dropped, a third "
            "tells which one is off")
        for r in records:
            r["flags"].append("may not be the same person")
    if report.outlier.any():
        names = ", ".join(Path(records[i]["path"]).name for i in np.flatnonzero(report.outlier))
        for i in np.flatnonzero(report.outlier):
            records[i]["flags"].append("outlier")
        if drop and report.majority:
            used &= ~report.outlier
            say(f"[yellow]warning:[/] dropped outlier photo(s) far from the others (probably someone else): {names}")
        elif drop:
            say(f"[yellow]warning:[/] outlier(s) {names} are not a minority, so none were dropped; "
                "check that the photos show one person")
        else:
            say(f"[yellow]warning:[/] outlier photo(s) far from the others (probably someone else): {names}; "
                "pass --drop-outliers to leave them out")
    return used


def _summarise(records: list[dict], used: np.ndarray, to_mean: np.ndarray, report: OutlierReport) -> None:
    for i, r in enumerate(records):
        r["quality"] = "ok" if not r["flags"] else ", ".join(r["flags"])
        r["used"] = bool(used[i])
        r["distance_to_mean"] = round(float(to_mean[i]), 4)
        r["loo_distance"] = None if np.isnan(report.loo_distance[i]) else round(float(report.loo_distance[i]), 4)


def _save_crops(photos: list[_Embedded], backend_name: str, cdir: Path, base: Path | None) -> None:
    """Write each photo's crops (and, for group photos, the numbered overview); note them in its record."""
    for i, p in enumerate(photos):
        stem = f"{i:02d}_{p.path.stem}"
        model_file = cdir / f"{stem}_{backend_name}{p.aligned.model_crop.shape[0]}.png"
        _save_png(model_file, p.aligned.model_crop)
        p.record["crop"] = _rel(model_file, base)
        if p.aligned.arcface_crop is p.aligned.model_crop:
            p.record["crop_arcface"] = p.record["crop"]
        else:
            arc_file = cdir / f"{stem}_arcface112.png"
            _save_png(arc_file, p.aligned.arcface_crop)
            p.record["crop_arcface"] = _rel(arc_file, base)
        if p.group_image is not None:
            overview = cdir / f"{stem}_faces.jpg"
            _faces_overview(p.group_image, p.faces, overview)
            p.record["faces_overview"] = _rel(overview, base)


def _photo_paths(photos: Sequence[str | Path], say: Callable[[str], None]) -> list[Path]:
    paths = collect_photos(photos)
    for path in paths:
        probe_photo(path)
    if len(paths) > PAPER_MAX_PHOTOS:
        say(f"[yellow]warning:[/] {len(paths)} photos given; the paper used up to {PAPER_MAX_PHOTOS} "
            "(all are used)")
    return paths


def compute_identity(photos: Sequence[str | Path], out_path: str | Path | None, cfg, *,
                     crops_dir: str | Path | None = None, face_index: int | None = None,
                     drop_outliers: bool | None = None, backend: FaceBackend | None = None,
                     console: Console | None = None, show_progress: bool = True) -> IdentityEmbedding:
    """Embed 1..N photos of one person and write the identity file (atomically) to ``out_path``.

    ``cfg`` is an ``IdentityConfig`` (or a full ``Config``). ``face_index``/``drop_outliers``
    override the config when given. Crops go to ``crops_dir`` (default ``<out stem>_crops/``
    beside the output) unless ``cfg.save_crops`` is false. Nothing is written unless every
    photo yields a face, so a bad input never leaves a partial output.
    """
    cfg = getattr(cfg, "identity", cfg)
    face_index = cfg.face_index if face_index is None else face_index
    drop = cfg.drop_outliers if drop_outliers is None else drop_outliers
    say = (lambda msg: console.print(msg, highlight=False)) if console is not None else (lambda msg: None)
    out = Path(out_path) if out_path is not None else None
    if out is not None and out.exists() and out.is_dir():
        raise IdtoError(f"output {out} is a folder; give a file name like identity.safetensors")

    paths = _photo_paths(photos, say)
    backend = backend if backend is not None else make_backend(cfg)
    done = _embed_photos(paths, backend, face_index, cfg, say, console, show_progress)
    records = [p.record for p in done]

    emb = np.stack([p.embedding for p in done])
    threshold = cfg.outlier_threshold or backend.same_person_threshold
    report = find_outliers(emb, threshold)
    used = _mark_outliers(records, report, threshold, drop, say)
    mean = l2_normalise(emb[used].mean(0))
    _summarise(records, used, identity_distance(emb, mean[None]), report)
    if cfg.save_crops and (crops_dir is not None or out is not None):
        cdir = Path(crops_dir) if crops_dir is not None else default_crops_dir(out)
        _save_crops(done, backend.name, cdir, out.parent if out is not None else None)
    ident = IdentityEmbedding(
        embedding=torch.from_numpy(mean), embeddings=torch.from_numpy(emb), used=torch.from_numpy(used),
        boxes=torch.from_numpy(np.stack([p.face.box for p in done]).astype(np.float32)),
        landmarks=torch.from_numpy(np.stack([p.face.landmarks5 for p in done]).astype(np.float32)),
        backend=backend.name, photos=records, path=out, recogniser=getattr(backend, "recogniser", None))
    if out is not None:
        save_identity(out, ident)
    return ident
