"""Build the priors' fine-tuning data from textured head scans (paper section B).

Input is laid out as NPHM: ``SCANS/<subject>/<expression>/scan.ply`` (digit folder names, e.g.
``017/005/scan.ply``); expression folder ``i`` is ``EXPRESSION_NAMES[i]`` unless a names file
says otherwise. Each scan is rotated into our head frame (+Y up, facing +Z), centred and scaled by
its bounding box so its largest extent is ``TEMPLATE_HEIGHT`` (it fits ``[-0.8, 0.8]^3``), and
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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from idto3d.atomic import atomic_write_bytes, atomic_write_text
from idto3d.config import CameraConfig
from idto3d.errors import IdtoError
from idto3d.priors.expressions import EXPRESSION_NAMES, get_expression

DOMAINS = ("normal", "albedo")
AXES = ("+x", "-x", "+y", "-y", "+z", "-z")
SCAN_SUFFIXES = (".ply", ".obj", ".glb", ".gltf", ".off")
MANIFEST_FORMAT = "idto3d.renders/1"
PROMPT = "A {view} view {what} face portrait of a {age} {ethnicity} {gender} on a white background"
_DOMAIN_WORDS = {"normal": "normal map", "albedo": "albedo"}
# Ages (years) at which the prompt's age group changes; NPHM subjects are adults.
AGE_GROUPS = ((13, "child"), (20, "teenage"), (36, "young"), (56, "middle-aged"), (math.inf, "elderly"))
_GENDER_WORDS = {"f": "female", "w": "female", "woman": "female", "m": "male", "man": "male"}


class DatasetBuildError(IdtoError):
    """Scans, metadata or identities cannot make a training set."""


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


# --- scans ----------------------------------------------------------------------------------------


@dataclass
class ScanSurface:
    """A scan in the head frame: shared positions for the geometry, per-corner colour data for albedo."""

    vertices: torch.Tensor  # [V, 3] merged positions, normalised
    faces: torch.Tensor  # [F, 3] into vertices
    attribute_faces: torch.Tensor  # [F, 3] into the colour/uv rows
    vertex_colors: torch.Tensor | None  # [Va, 3] in [0, 1]
    uv: torch.Tensor | None  # [Va, 2]
    texture: torch.Tensor | None  # [Ht, Wt, 3] in [0, 1]

    def to(self, device: torch.device | str) -> "ScanSurface":
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return ScanSurface(mv(self.vertices), mv(self.faces), mv(self.attribute_faces), mv(self.vertex_colors),
                           mv(self.uv), mv(self.texture))

    @property
    def has_color(self) -> bool:
        return self.vertex_colors is not None or self.texture is not None


def axis_rotation(up: str = "+y", forward: str = "+z") -> np.ndarray:
    """The 3x3 rotation taking the scan's ``up`` axis to +Y and its ``forward`` axis to +Z."""
    for name, value in (("up", up), ("forward", forward)):
        if value not in AXES:
            raise DatasetBuildError(f"{name} axis must be one of {', '.join(AXES)}, got {value!r}")
    vec = {a: np.eye(3)[[0, 0, 1, 1, 2, 2][i]] * (1 if a[0] == "+" else -1) for i, a in enumerate(AXES)}
    y, z = vec[up], vec[forward]
    if abs(float(y @ z)) > 0.5:
        raise DatasetBuildError(f"up ({up}) and forward ({forward}) must be different, perpendicular axes")
    return np.stack([np.cross(y, z), y, z])  # rows: where new x, y, z come from


def _texture_image(visual: object) -> tuple[object | None, np.ndarray]:
    material = getattr(visual, "material", None)
    image = getattr(material, "image", None)
    factor = np.ones(3)
    if image is None:
        image = getattr(material, "baseColorTexture", None)
        base = getattr(material, "baseColorFactor", None)
        if base is not None:
            base = np.asarray(base, dtype=np.float64)[:3]
            factor = base / 255.0 if base.max() > 1.0 else base
    return image, factor


def load_scan(path: str | Path, up: str = "+y", forward: str = "+z", max_texture_size: int = 2048) -> ScanSurface:
    """Read a scan with its vertex colours or UV texture and normalise it into the head frame."""
    import trimesh
    from PIL import Image

    from idto3d.geometry.template import TEMPLATE_HEIGHT

    path = Path(path)
    try:
        loaded = trimesh.load(path, process=False)
    except Exception as exc:  # noqa: BLE001 - every parser failure means the same thing to a user
        raise DatasetBuildError(f"could not read scan {path}: {str(exc).splitlines()[0][:200] if str(exc) else exc!r}")
    if isinstance(loaded, trimesh.Scene):
        parts = [g for g in loaded.dump(concatenate=False) if isinstance(g, trimesh.Trimesh) and len(g.faces)]
        if not parts:
            raise DatasetBuildError(f"scan {path} contains no triangle mesh")
        loaded = parts[0] if len(parts) == 1 else trimesh.util.concatenate(parts)
    if not isinstance(loaded, trimesh.Trimesh) or len(loaded.faces) == 0:
        raise DatasetBuildError(f"scan {path} is not a triangle mesh (a point cloud or empty file?)")

    v = np.asarray(loaded.vertices, dtype=np.float64)
    f = np.asarray(loaded.faces, dtype=np.int64)
    if not np.isfinite(v).all():
        raise DatasetBuildError(f"scan {path} has NaN or infinite vertex coordinates")

    colors = uv = texture = None
    visual = loaded.visual
    if visual.kind == "texture" and getattr(visual, "uv", None) is not None:
        image, factor = _texture_image(visual)
        if image is not None:
            uv = torch.from_numpy(np.asarray(visual.uv, dtype=np.float32)[:, :2].copy())
            img = image.convert("RGB")
            if max(img.size) > max_texture_size:
                # Box-filtered downsizing doubles as the prefilter bilinear lookups lack.
                s = max_texture_size / max(img.size)
                img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.BOX)
            tex = np.asarray(img, dtype=np.float32) / 255.0 * factor.astype(np.float32)
            texture = torch.from_numpy(np.ascontiguousarray(tex))
    elif visual.kind in ("vertex", "face"):
        # Face colours are spread to vertices by trimesh (averaged).
        colors = torch.from_numpy(np.asarray(visual.vertex_colors, dtype=np.float32)[:, :3] / 255.0)

    # Positions split at UV seams are merged, so smooth normals do not crease there.
    merged, inverse = np.unique(v, axis=0, return_inverse=True)
    pos_faces = inverse.reshape(-1)[f]
    merged = merged @ axis_rotation(up, forward).T
    lo, hi = merged.min(0), merged.max(0)
    extent = float((hi - lo).max())
    if not extent > 0:
        raise DatasetBuildError(f"scan {path} has zero size")
    merged = (merged - 0.5 * (lo + hi)) * (TEMPLATE_HEIGHT / extent)
    # Scans are open at the neck but still enclose a positive volume seen from their centroid
    # when their faces point outward; flip inward-facing scans so normal maps are not inverted.
    c = merged.mean(0)
    a, b, d = (merged[pos_faces[:, i]] - c for i in range(3))
    if np.einsum("ij,ij->i", a, np.cross(b, d)).sum() < 0:
        pos_faces, f = pos_faces[:, [0, 2, 1]], f[:, [0, 2, 1]]
    return ScanSurface(
        vertices=torch.from_numpy(merged.astype(np.float32)),
        faces=torch.from_numpy(np.ascontiguousarray(pos_faces)),
        attribute_faces=torch.from_numpy(np.ascontiguousarray(f)),
        vertex_colors=colors, uv=uv, texture=texture,
    )


# --- rendering ------------------------------------------------------------------------------------


def _scan_seed(seed: int, subject: str, expression_id: str) -> int:
    """Per-scan seed, so a scan's cameras do not depend on which other scans exist or were done."""
    digest = hashlib.sha256(f"{seed}/{subject}/{expression_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def scan_cameras(entry: ScanEntry, views: int, seed: int, camera: CameraConfig):
    from idto3d.render.camera import sample_orbit_cameras

    gen = torch.Generator().manual_seed(_scan_seed(seed, entry.subject, entry.expression_id))
    return sample_orbit_cameras(views, camera.elevation_deg, camera.azimuth_deg, camera.radius,
                                camera.fov_deg, generator=gen)


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
    from idto3d.pipeline.progress import progress_bar
    from idto3d.render.albedo import render_albedo
    from idto3d.render.backend import get_rasterizer
    from idto3d.render.camera import view_word
    from idto3d.render.mesh import Mesh
    from idto3d.render.normals import render_normal_map
    from idto3d.render.preview import save_png

    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise DatasetBuildError(f"--views must be a positive integer, got {views!r}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or not 16 <= resolution <= 4096:
        raise DatasetBuildError(f"--resolution must be an integer in [16, 4096], got {resolution!r}")
    axis_rotation(up, forward)  # validate before any work
    camera = camera if camera is not None else CameraConfig()
    names = tuple(get_expression(n).name for n in expression_names) if expression_names else EXPRESSION_NAMES
    out = Path(out)
    entries = find_scans(scans, names)
    meta = read_subject_metadata(metadata)
    subjects = sorted({e.subject for e in entries})
    missing = [s for s in subjects if _subject_key(s) not in meta]
    if missing:
        raise DatasetBuildError(f"{metadata} has no row for subject(s) {', '.join(missing)}; add one per scanned "
                                "subject (columns subject, gender, age, ethnicity)")
    out.mkdir(parents=True, exist_ok=True)
    id_paths = _copy_identities(Path(identities), subjects, out) if identities is not None else {}
    _check_manifest(out, {
        "format": MANIFEST_FORMAT, "views": views, "resolution": resolution, "seed": seed, "up": up,
        "forward": forward, "camera": {k: list(v) for k, v in asdict(camera).items()},
        "expression_names": list(names),
    })
    domains = ("normal",) if normals_only else DOMAINS
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    rasterizer = get_rasterizer(backend, device)
    records, rendered, skipped = [], 0, 0
    with progress_bar("render-dataset", total=len(entries) * views * len(domains), enabled=progress,
                      console=console) as update:
        for entry in entries:
            cams = scan_cameras(entry, views, seed, camera)
            words = view_word(cams.azimuth_deg)
            info = meta[_subject_key(entry.subject)]
            stem = f"{entry.subject}_{entry.expression_id}"
            todo: dict[str, list[int]] = {d: [] for d in domains}
            for k in range(views):
                for d in domains:
                    rel = f"{d}/{stem}_{k:03d}.png"
                    records.append({
                        "image": rel, "domain": d, "prompt": make_prompt(words[k], d, info),
                        "subject": entry.subject, "expression": entry.expression,
                        "expression_id": entry.expression_id, "view": words[k],
                        "camera": {"elevation": float(cams.elevation_deg[k]), "azimuth": float(cams.azimuth_deg[k]),
                                   "radius": float(cams.radius[k]), "fov": float(cams.fov_deg[k])},
                        "id_embedding": id_paths.get(entry.subject),
                    })
                    if (out / rel).is_file():
                        skipped += 1
                        update()
                    else:
                        todo[d].append(k)
            if not any(todo.values()):
                continue
            surface = load_scan(entry.path, up, forward)
            if "albedo" in domains and not surface.has_color:
                raise DatasetBuildError(
                    f"scan {entry.path} has no vertex colours or texture image, so it has no albedo; "
                    "give it colours, or pass --normals-only to render normal maps only")
            surface = surface.to(device)
            mesh = Mesh(surface.vertices, surface.faces)
            for d, ks in todo.items():
                for start in range(0, len(ks), views_per_batch):
                    chunk = ks[start:start + views_per_batch]
                    sub = cams[torch.tensor(chunk)]
                    with torch.no_grad():
                        if d == "normal":
                            img = render_normal_map(mesh, sub, resolution, rasterizer=rasterizer).image
                        else:
                            img = render_albedo(mesh, sub, resolution, surface.vertex_colors, uv=surface.uv,
                                                texture=surface.texture, attribute_faces=surface.attribute_faces,
                                                rasterizer=rasterizer).image
                    for k, im in zip(chunk, img):
                        save_png(_to_png(im), out / d / f"{stem}_{k:03d}.png")
                        rendered += 1
                        update()
    index = out / "index.jsonl"
    atomic_write_text(index, "".join(json.dumps(r) + "\n" for r in records))
    return RenderDatasetReport(images=len(records), rendered=rendered, skipped=skipped, scans=len(entries),
                               subjects=len(subjects), index=index)


__all__ = [
    "AGE_GROUPS", "DOMAINS", "DatasetBuildError", "RenderDatasetReport", "ScanEntry", "ScanSurface",
    "SubjectInfo", "age_group", "axis_rotation", "build_render_dataset", "find_scans", "load_scan",
    "make_prompt", "read_expression_names", "read_subject_metadata", "scan_cameras",
]
