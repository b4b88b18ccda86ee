"""Build the priors' fine-tuning data from textured head scans (paper section B).

Input is laid out as NPHM: ``SCANS/<subject>/<expression>/scan.ply`` (digit folder names, e.g.
``017/005/scan.ply``); expression folder ``i`` is ``EXPRESSION_NAMES[i]`` unless a names file
says otherwise. Each scan is loaded by ``scans.load_scan`` (rotated into our head frame, +Y up and
facing +Z, centred and scaled by its bounding box so its largest extent is ``TEMPLATE_HEIGHT``) and
rendered from random orbit cameras as a camera-space normal map and an albedo image, both on
white. Every image gets a prompt built from the subject's metadata row and the view word, and a
line in ``index.jsonl``.

Assumption: NPHM scans share FLAME's axes (+Y up, the face looking down +Z); other data can say
``up``/``forward``. Their units do not matter since each scan is normalised by its bounding box.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from idto3d.core.atomic import atomic_write_bytes, atomic_write_text
from idto3d.core.config import CameraConfig
from idto3d.core.expressions import EXPRESSION_NAMES, get_expression
from idto3d.priors.training.scans import DatasetBuildError, axis_rotation, load_scan

DOMAINS = ("normal", "albedo")
SCAN_SUFFIXES = (".ply", ".obj", ".glb", ".gltf", ".off")
MANIFEST_FORMAT = "idto3d.renders/1"
PROMPT = "A {view} view {what} face portrait of a {age} {ethnicity} {gender} on a white background"
_DOMAIN_WORDS = {"normal": "normal map", "albedo": "albedo"}
# Ages (years) at which the prompt's age group changes; NPHM subjects are adults.
AGE_GROUPS = ((13, "child"), (20, "teenage"), (36, "young"), (56, "middle-aged"), (math.inf, "elderly"))
_GENDER_WORDS = {"f": "female", "w": "female", "woman": "female", "m": "male", "man": "male"}


# --- inputs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScanEntry:
    subject: str  # folder name, e.g. "017"
    expression_id: str  # folder name, e.g. "005"
    expression: str  # canonical expression name
    path: Path


@dataclass(frozen=True)
class SubjectInfo:
    gender: str
    age_group: str
    ethnicity: str


def read_expression_names(path: str | Path) -> tuple[str, ...]:
    """One expression name per line (blank lines and ``#`` comments ignored), validated."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetBuildError(f"cannot read the expression names file {path}: {exc}") from None
    names = []
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            names.append(get_expression(line).name)
        except ValueError as exc:
            raise DatasetBuildError(f"{path}, line {n}: {exc}") from None
    if not names:
        raise DatasetBuildError(f"{path} lists no expression names (one name per line expected)")
    return tuple(names)


def find_scans(root: str | Path, expression_names: Sequence[str] = EXPRESSION_NAMES) -> list[ScanEntry]:
    """Every ``<subject>/<expression>/scan.*`` under ``root``, sorted, with its expression name."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetBuildError(f"scan folder not found: {root}")
    scans = []
    for sdir in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        for edir in sorted(p for p in sdir.iterdir() if p.is_dir() and p.name.isdigit()):
            files = [edir / f"scan{s}" for s in SCAN_SUFFIXES if (edir / f"scan{s}").is_file()]
            if not files:
                warnings.warn(f"{edir} holds no scan.ply (or .obj/.glb); skipped", stacklevel=2)
                continue
            index = int(edir.name)
            if index >= len(expression_names):
                raise DatasetBuildError(
                    f"expression folder {edir} is index {index} but only {len(expression_names)} expression "
                    "names are known; pass --expression-names FILE listing one name per folder index")
            scans.append(ScanEntry(sdir.name, edir.name, expression_names[index], files[0]))
    if not scans:
        raise DatasetBuildError(
            f"no scans found in {root}: expected the NPHM layout <subject>/<expression>/scan.ply "
            "with numeric folder names, e.g. 017/000/scan.ply")
    return scans


def _subject_key(name: str) -> str:
    name = name.strip()
    return str(int(name)) if name.isdigit() else name


def age_group(age: str) -> str:
    """A number of years -> its group word (young, middle-aged, ...); a word is kept as it is."""
    text = age.strip()
    try:
        years = float(text)
    except ValueError:
        if not text:
            raise ValueError("age is empty") from None
        return text.lower()
    if not math.isfinite(years) or years < 0 or years > 130:
        raise ValueError(f"age {text!r} is not a plausible number of years")
    return next(word for limit, word in AGE_GROUPS if years < limit)


def read_subject_metadata(path: str | Path) -> dict[str, SubjectInfo]:
    """CSV with columns subject, gender, age, ethnicity (any order/case, extra columns ignored)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DatasetBuildError(f"metadata file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetBuildError(f"cannot read metadata file {path}: {exc}") from None
    reader = csv.DictReader(text.splitlines())
    columns = {c.strip().lower(): c for c in (reader.fieldnames or []) if c}
    missing = [c for c in ("subject", "gender", "age", "ethnicity") if c not in columns]
    if missing:
        raise DatasetBuildError(
            f"{path} lacks column(s) {', '.join(missing)}; it needs a header row with subject, gender, age, "
            f"ethnicity (found: {', '.join(columns) or 'none'})")
    out: dict[str, SubjectInfo] = {}
    for line, row in enumerate(reader, 2):
        values = {k: (row.get(orig) or "").strip() for k, orig in columns.items()}
        where = f"{path}, line {line}"
        if not values["subject"]:
            raise DatasetBuildError(f"{where}: empty subject")
        for key in ("gender", "ethnicity"):
            if not values[key]:
                raise DatasetBuildError(f"{where}: empty {key} for subject {values['subject']}")
        try:
            group = age_group(values["age"])
        except ValueError as exc:
            raise DatasetBuildError(f"{where}: {exc} (subject {values['subject']})") from None
        key = _subject_key(values["subject"])
        if key in out:
            raise DatasetBuildError(f"{where}: subject {values['subject']} appears twice")
        gender = _GENDER_WORDS.get(values["gender"].lower(), values["gender"].lower())
        out[key] = SubjectInfo(gender=gender, age_group=group, ethnicity=values["ethnicity"])
    return out


def make_prompt(view: str, domain: str, info: SubjectInfo) -> str:
    """The paper's prompt, e.g. 'A front view normal map face portrait of a young Caucasian female ...'."""
    if domain not in DOMAINS:
        raise DatasetBuildError(f"unknown domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    return PROMPT.format(view=view, what=_DOMAIN_WORDS[domain], age=info.age_group,
                         ethnicity=info.ethnicity, gender=info.gender)


# --- rendering ------------------------------------------------------------------------------------


def _scan_seed(seed: int, subject: str, expression_id: str) -> int:
    """Per-scan seed, so a scan's cameras do not depend on which other scans exist or were done."""
    digest = hashlib.sha256(f"{seed}/{subject}/{expression_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def scan_cameras(entry: ScanEntry, views: int, seed: int, camera: CameraConfig):
    from idto3d.render.camera import sample_orbit_cameras

    gen = torch.Generator().manual_seed(_scan_seed(seed, entry.subject, entry.expression_id))
    return sample_orbit_cameras(views, camera.elevation_deg, camera.azimuth_deg, camera.radius,
                                camera.fov_deg, generator=gen, target=camera.target)


def _to_png(image: torch.Tensor) -> np.ndarray:
    return (image.detach().clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


def _copy_identities(folder: Path, subjects: Sequence[str], out: Path) -> dict[str, str]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not folder.is_dir():
        raise DatasetBuildError(f"identities folder not found: {folder}")
    missing = [s for s in subjects if not (folder / f"{s}.safetensors").is_file()]
    if missing:
        raise DatasetBuildError(
            f"{folder} has no identity file for subject(s) {', '.join(missing)} "
            f"(expected <subject>.safetensors, e.g. {missing[0]}.safetensors from 'idto3d identity')")
    paths, dims = {}, {}
    for s in subjects:
        src = folder / f"{s}.safetensors"
        try:
            emb = load_file(src).get("embedding")
        except (SafetensorError, OSError, ValueError) as exc:
            raise DatasetBuildError(f"{src} is not a readable safetensors identity file: {exc}") from None
        if emb is None or emb.dim() != 1 or emb.numel() == 0 or not torch.isfinite(emb).all():
            raise DatasetBuildError(f"{src} has no valid 'embedding' tensor (a finite 1-D vector is needed)")
        dims[s] = emb.numel()
        dst = out / "identities" / f"{s}.safetensors"
        data = src.read_bytes()
        if not (dst.is_file() and dst.read_bytes() == data):
            atomic_write_bytes(dst, data)
        paths[s] = dst.relative_to(out).as_posix()
    if len(set(dims.values())) > 1:
        raise DatasetBuildError(f"identity files have different embedding sizes: {dims}; use one backend for all")
    return paths


def _camera_manifest(camera: CameraConfig) -> dict:
    """The camera ranges a dataset was rendered with; the look-at target only when it is not the origin, so that a
    dataset rendered before ``render.camera.target`` existed resumes under the default camera."""
    out = {k: list(v) for k, v in asdict(camera).items()}
    if tuple(camera.target) == (0.0, 0.0, 0.0):
        del out["target"]
    return out


def _check_manifest(out: Path, manifest: dict) -> None:
    path = out / "dataset.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = None
        if old != manifest:
            diff = sorted(k for k in manifest if not isinstance(old, dict) or old.get(k) != manifest[k])
            raise DatasetBuildError(
                f"{out} was rendered with different settings ({', '.join(diff) or 'unreadable dataset.json'}); "
                "rerun with the same settings to resume, or choose a new --out folder")
    else:
        atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")


@dataclass
class RenderDatasetReport:
    images: int
    rendered: int
    skipped: int
    scans: int
    subjects: int
    index: Path


def _check_render_args(views: int, resolution: int, up: str, forward: str) -> None:
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise DatasetBuildError(f"--views must be a positive integer, got {views!r}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or not 16 <= resolution <= 4096:
        raise DatasetBuildError(f"--resolution must be an integer in [16, 4096], got {resolution!r}")
    axis_rotation(up, forward)  # validate before any work


def _subjects_with_metadata(entries: list[ScanEntry], metadata: str | Path
                            ) -> tuple[list[str], dict[str, SubjectInfo]]:
    """The scanned subjects (sorted) and the metadata rows; every scanned subject needs a row."""
    meta = read_subject_metadata(metadata)
    subjects = sorted({e.subject for e in entries})
    missing = [s for s in subjects if _subject_key(s) not in meta]
    if missing:
        raise DatasetBuildError(f"{metadata} has no row for subject(s) {', '.join(missing)}; add one per scanned "
                                "subject (columns subject, gender, age, ethnicity)")
    return subjects, meta


def _image_record(entry: ScanEntry, cams, k: int, word: str, domain: str, info: SubjectInfo, rel: str,
                  id_path: str | None) -> dict:
    """One ``index.jsonl`` line: view ``k`` of ``entry`` in ``domain``."""
    return {
        "image": rel, "domain": domain, "prompt": make_prompt(word, domain, info),
        "subject": entry.subject, "expression": entry.expression,
        "expression_id": entry.expression_id, "view": word,
        "camera": {"elevation": float(cams.elevation_deg[k]), "azimuth": float(cams.azimuth_deg[k]),
                   "radius": float(cams.radius[k]), "fov": float(cams.fov_deg[k])},
        "id_embedding": id_path,
    }


def _load_for_domains(entry: ScanEntry, up: str, forward: str, domains: Sequence[str], device: torch.device):
    """The scan on ``device``; one without colours is refused before any albedo is rendered."""
    surface = load_scan(entry.path, up, forward)
    if "albedo" in domains and not surface.has_color:
        raise DatasetBuildError(
            f"scan {entry.path} has no vertex colours or texture image, so it has no albedo; "
            "give it colours, or pass --normals-only to render normal maps only")
    return surface.to(device)


def _render_views(mesh, surface, cams, domain: str, resolution: int, rasterizer) -> torch.Tensor:
    """``[B, H, W, 3]`` images of ``surface`` (as ``mesh``) from ``cams``: camera-space normals or albedo."""
    from idto3d.render.albedo import render_albedo
    from idto3d.render.normals import render_normal_map

    with torch.no_grad():
        if domain == "normal":
            return render_normal_map(mesh, cams, resolution, rasterizer=rasterizer).image
        return render_albedo(mesh, cams, resolution, surface.vertex_colors, uv=surface.uv, texture=surface.texture,
                             attribute_faces=surface.attribute_faces, rasterizer=rasterizer).image


@dataclass
class _RenderJob:
    """What every scan shares: where the images go and how they are rendered."""

    out: Path
    domains: tuple[str, ...]
    views: int
    resolution: int
    seed: int
    camera: CameraConfig
    up: str
    forward: str
    views_per_batch: int
    device: torch.device
    rasterizer: object
    update: Callable[..., None]


def _render_scan(job: _RenderJob, entry: ScanEntry, info: SubjectInfo, id_path: str | None
                 ) -> tuple[list[dict], int, int]:
    """Records for all of ``entry``'s images, rendering those not on disk yet; ``(records, rendered, skipped)``."""
    from idto3d.render.camera import view_word
    from idto3d.render.mesh import Mesh
    from idto3d.render.preview import save_png

    cams = scan_cameras(entry, job.views, job.seed, job.camera)
    words = view_word(cams.azimuth_deg)
    stem = f"{entry.subject}_{entry.expression_id}"
    records, todo, skipped = [], {d: [] for d in job.domains}, 0
    for k in range(job.views):
        for d in job.domains:
            rel = f"{d}/{stem}_{k:03d}.png"
            records.append(_image_record(entry, cams, k, words[k], d, info, rel, id_path))
            if (job.out / rel).is_file():
                skipped += 1
                job.update()
            else:
                todo[d].append(k)
    if not any(todo.values()):
        return records, 0, skipped
    surface = _load_for_domains(entry, job.up, job.forward, job.domains, job.device)
    mesh = Mesh(surface.vertices, surface.faces)
    rendered = 0
    for d, ks in todo.items():
        for start in range(0, len(ks), job.views_per_batch):
            chunk = ks[start:start + job.views_per_batch]
            images = _render_views(mesh, surface, cams[torch.tensor(chunk)], d, job.resolution, job.rasterizer)
            for k, im in zip(chunk, images):
                save_png(_to_png(im), job.out / d / f"{stem}_{k:03d}.png")
                rendered += 1
                job.update()
    return records, rendered, skipped


def build_render_dataset(
    scans: str | Path,
    out: str | Path,
    metadata: str | Path,
    *,
    views: int = 8,
    resolution: int = 512,
    seed: int = 0,
    identities: str | Path | None = None,
    expression_names: Sequence[str] | None = None,
    normals_only: bool = False,
    up: str = "+y",
    forward: str = "+z",
    camera: CameraConfig | None = None,
    backend: str = "auto",
    views_per_batch: int = 4,
    device: str | torch.device | None = None,
    progress: bool = True,
    console: object | None = None,
) -> RenderDatasetReport:
    """Render every scan under ``scans`` into ``out`` (see the module doc); resumable and deterministic."""
    from idto3d.core.progress import progress_bar
    from idto3d.render.backend import get_rasterizer

    _check_render_args(views, resolution, up, forward)
    camera = camera if camera is not None else CameraConfig()
    names = tuple(get_expression(n).name for n in expression_names) if expression_names else EXPRESSION_NAMES
    out = Path(out)
    entries = find_scans(scans, names)
    subjects, meta = _subjects_with_metadata(entries, metadata)
    out.mkdir(parents=True, exist_ok=True)
    id_paths = _copy_identities(Path(identities), subjects, out) if identities is not None else {}
    _check_manifest(out, {
        "format": MANIFEST_FORMAT, "views": views, "resolution": resolution, "seed": seed, "up": up,
        "forward": forward, "camera": _camera_manifest(camera),
        "expression_names": list(names),
    })
    domains = ("normal",) if normals_only else DOMAINS
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    rasterizer = get_rasterizer(backend, device)
    records, rendered, skipped = [], 0, 0
    with progress_bar("render-dataset", total=len(entries) * views * len(domains), enabled=progress,
                      console=console) as update:
        job = _RenderJob(out, domains, views, resolution, seed, camera, up, forward, views_per_batch, device,
                         rasterizer, update)
        for entry in entries:
            scan_records, scan_rendered, scan_skipped = _render_scan(
                job, entry, meta[_subject_key(entry.subject)], id_paths.get(entry.subject))
            records += scan_records
            rendered += scan_rendered
            skipped += scan_skipped
    index = out / "index.jsonl"
    atomic_write_text(index, "".join(json.dumps(r) + "\n" for r in records))
    return RenderDatasetReport(images=len(records), rendered=rendered, skipped=skipped, scans=len(entries),
                               subjects=len(subjects), index=index)


__all__ = [
    "AGE_GROUPS", "DOMAINS", "DatasetBuildError", "RenderDatasetReport", "ScanEntry", "SubjectInfo", "age_group",
    "build_render_dataset", "find_scans", "make_prompt", "read_expression_names", "read_subject_metadata",
    "scan_cameras",
]
