"""Synthetic head scans with ground truth: random face-model subjects merged into the head template.

Each subject is a random shape code of the morphable face model (a draw from its prior: ``N(0, shape_std^2)`` per
component, in prior-std units), merged into the built-in head template exactly as the offline path merges a
fitted face (``subject_init.subject_targets``: the same placement, border falloff and ``merge_face``), posed in
each expression by the face model's expression components (``offline_expressions``). Vertex colours: a per-subject
skin tone with redder lips and a smooth low-frequency variation. Scans are written in the NPHM layout that
``render-dataset`` reads: ``OUT/<subject:03d>/<expression index:03d>/scan.ply`` (the folder index is the
expression's index in ``core.expressions.EXPRESSION_NAMES``, so no names file is needed), ``OUT/subjects.csv``
(subject, gender, age, ethnicity) and ``OUT/synth.json`` (the settings and every subject's shape code and tone:
the ground truth). Every subject's draw is seeded by ``(seed, subject index)``, so subject 3 is the same head
whether 4 or 40 subjects are made; re-running skips scans already written with the same settings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from idto3d.core.atomic import atomic_write, atomic_write_text
from idto3d.core.config import Config, load_config
from idto3d.core.errors import IdtoError
from idto3d.core.expressions import EXPRESSION_NAMES, get_expression
from idto3d.render.mesh import Mesh

SYNTH_FORMAT = "idto3d.synth-scans/1"
# Skin albedo range (linear-ish RGB in [0, 1]) from light to dark; a subject's tone is a point on this line.
_LIGHT_SKIN = np.array([0.86, 0.68, 0.58])
_DARK_SKIN = np.array([0.36, 0.23, 0.17])
_LIP_TINT = np.array([0.70, 0.32, 0.32])
_GENDERS = ("female", "male")
_ETHNICITIES = ("synthetic",)


class SynthScansError(IdtoError):
    """Bad settings for synthetic scans."""


@dataclass(frozen=True)
class SynthSubject:
    index: int
    shape: torch.Tensor  # [K] face-model shape code, prior-std units
    tone: float          # 0 = lightest skin, 1 = darkest
    gender: str
    age: int


def subject_seed(seed: int, index: int) -> int:
    """Per-subject seed: a subject's head does not depend on how many subjects are made."""
    digest = hashlib.sha256(f"synth/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def draw_subject(index: int, seed: int, num_shape: int, shape_std: float) -> SynthSubject:
    gen = torch.Generator().manual_seed(subject_seed(seed, index))
    shape = torch.randn(num_shape, generator=gen) * shape_std
    tone, g, age = torch.rand(3, generator=gen).tolist()
    return SynthSubject(index, shape, tone, _GENDERS[int(g * len(_GENDERS))], 20 + int(age * 50))


def skin_colours(vertices: torch.Tensor, subject: SynthSubject, lips: torch.Tensor) -> torch.Tensor:
    """``[V, 3]`` in [0, 1]: the subject's tone, a smooth blotchy variation, lips blended in by ``lips`` [V]."""
    base = torch.from_numpy((1 - subject.tone) * _LIGHT_SKIN + subject.tone * _DARK_SKIN).float()
    gen = torch.Generator().manual_seed(subject_seed(subject.index, 7919))
    freq = torch.randn(4, 3, generator=gen) * 4.0
    phase = torch.rand(4, generator=gen) * 6.283
    variation = torch.sin(vertices @ freq.T + phase).mean(-1, keepdim=True) * 0.08
    colour = base * (1 + variation)
    lip = torch.from_numpy(_LIP_TINT).float() * (0.6 + 0.4 * base / base.max())
    colour = colour * (1 - lips[:, None]) + lip * lips[:, None]
    return colour.clamp(0, 1)


def lip_weights(head: Mesh, mouth_centre: torch.Tensor, radius: float) -> torch.Tensor:
    """``[V]`` in [0, 1]: 1 on the lips (an ellipse around the mouth, wider than tall), 0 beyond."""
    d = (head.vertices - mouth_centre) / torch.tensor([radius, radius * 0.4, radius])
    return (1 - d.norm(dim=-1)).clamp(0, 1).mul(3).clamp(max=1)


def subject_heads(model, subject: SynthSubject, cfg: Config) -> list[Mesh]:
    """One closed head per ``cfg.expressions``: the offline path's merge (``subject_targets``) of this shape."""
    from idto3d.face_model.landmark_fit import FaceFit
    from idto3d.geometry.face_merge import placement
    from idto3d.stages.subject_init import SubjectFit, subject_targets

    fit = FaceFit(model.name, subject.shape, [])
    place = placement(fit.neutral_vertices(model), model.landmarks)
    return subject_targets(SubjectFit(model, fit, place, [], []), cfg)


def _write_ply(head: Mesh, colours: torch.Tensor, path: Path) -> None:
    import trimesh

    rgba = np.concatenate([(colours.numpy() * 255 + 0.5).astype(np.uint8),
                           np.full((len(colours), 1), 255, np.uint8)], axis=1)
    tm = trimesh.Trimesh(head.vertices.detach().double().numpy(), head.faces.numpy(), vertex_colors=rgba,
                         process=False)
    data = tm.export(file_type="ply", encoding="binary")
    atomic_write(path, lambda p: p.write_bytes(data))


def _check_settings(out: Path, settings: dict) -> None:
    path = out / "synth.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8")).get("settings")
    except (OSError, json.JSONDecodeError, AttributeError):
        old = None
    if old != settings:
        raise SynthScansError(f"{out} holds synthetic scans made with other settings; rerun with the same settings "
                              "to resume, or choose a new folder")


def _check_args(subjects: int, expressions: Sequence[str], shape_std: float, first: int) -> tuple[str, ...]:
    from idto3d.face_model.offline_expressions import OFFLINE_EXPRESSIONS

    if isinstance(subjects, bool) or not isinstance(subjects, int) or not 1 <= subjects <= 999:
        raise SynthScansError(f"--subjects must be an integer in [1, 999], got {subjects!r}")
    if not 0 <= first or first + subjects > 1000:
        raise SynthScansError(f"--first {first} + --subjects {subjects} must stay within subject folders 000-999")
    if not 0.0 <= shape_std <= 3.0:
        raise SynthScansError(f"--shape-std must be in [0, 3] (prior-std units), got {shape_std}")
    names = []
    for name in expressions:
        try:
            key = get_expression(name).name
        except ValueError as exc:
            raise SynthScansError(str(exc)) from None
        if key not in OFFLINE_EXPRESSIONS:
            raise SynthScansError(f"the face model cannot show '{key}'; synthetic expressions: "
                                  f"{', '.join(OFFLINE_EXPRESSIONS)}")
        names.append(key)
    if not names or len(set(names)) != len(names):
        raise SynthScansError(f"--expressions needs at least one expression and no duplicates, got {list(names)}")
    return tuple(names)


@dataclass
class SynthReport:
    subjects: int
    scans: int
    written: int
    skipped: int
    out: Path


def synth_scans(out: str | Path, *, subjects: int, expressions: Sequence[str] = ("neutral", "smile", "mouth_open"),
                seed: int = 0, shape_std: float = 1.0, first: int = 0, template_resolution: int | None = None,
                update: Callable[[], None] | None = None) -> SynthReport:
    """Write ``subjects`` synthetic subjects (folders ``first`` .. ``first + subjects - 1``) into ``out``."""
    from idto3d.face_model.morphable_model import load_morphable_model

    names = _check_args(subjects, expressions, shape_std, first)
    cfg = load_config()
    cfg.expressions = list(names)
    if template_resolution is not None:
        cfg.template.build_resolution = template_resolution
    model = load_morphable_model(cfg.face_model.path)
    out = Path(out)
    settings = {"format": SYNTH_FORMAT, "seed": seed, "shape_std": shape_std, "model": model.name,
                "template_resolution": cfg.template.build_resolution}
    _check_settings(out, settings)
    out.mkdir(parents=True, exist_ok=True)
    record = _read_record(out)
    written = skipped = 0
    for index in range(first, first + subjects):
        subject = draw_subject(index, seed, model.num_shape, shape_std)
        paths = [out / f"{index:03d}" / f"{EXPRESSION_NAMES.index(n):03d}" / "scan.ply" for n in names]
        if all(p.is_file() for p in paths) and f"{index:03d}" in record["subjects"]:
            skipped += len(paths)
        else:
            heads = subject_heads(model, subject, cfg)
            lips = _lips_for(model, subject, heads[0])
            colours = skin_colours(heads[0].vertices, subject, lips)
            for head, path in zip(heads, paths):
                _write_ply(head, colours, path)  # same topology in every expression: colours follow the skin
                written += 1
        record["subjects"][f"{index:03d}"] = {
            "shape": [round(float(x), 6) for x in subject.shape], "tone": round(subject.tone, 6),
            "gender": subject.gender, "age": subject.age,
            "expressions": {n: p.relative_to(out).as_posix() for n, p in zip(names, paths)}}
        if update is not None:
            update()
    record["settings"] = settings
    atomic_write_text(out / "synth.json", json.dumps(record, indent=1) + "\n")
    _write_csv(out, record)
    return SynthReport(len(record["subjects"]), written + skipped, written, skipped, out)


def _lips_for(model, subject: SynthSubject, head: Mesh) -> torch.Tensor:
    """Lip weights on the merged neutral head: around the placed face's mouth landmarks."""
    from idto3d.face_model.landmark_fit import FaceFit
    from idto3d.geometry.face_merge import placement

    fit = FaceFit(model.name, subject.shape, [])
    face = fit.neutral_vertices(model)
    place = placement(face, model.landmarks)
    mouth = place(face[model.landmarks[48:68]])
    centre = mouth.mean(0)
    radius = float((mouth[:, 0].max() - mouth[:, 0].min()) / 2) * 1.1
    return lip_weights(head, centre, radius)


def _read_record(out: Path) -> dict:
    path = out / "synth.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data.get("subjects"), dict):
                return data
        except (OSError, json.JSONDecodeError, AttributeError):
            pass
    return {"settings": None, "subjects": {}}


def _write_csv(out: Path, record: dict) -> None:
    rows = ["subject,gender,age,ethnicity"]
    rows += [f"{k},{v['gender']},{v['age']},{_ETHNICITIES[0]}" for k, v in sorted(record["subjects"].items())]
    atomic_write_text(out / "subjects.csv", "\n".join(rows) + "\n")


def shape_codes(out: str | Path) -> dict[str, torch.Tensor]:
    """Every subject's ground-truth shape code from ``synth.json``, by subject folder name."""
    record = _read_record(Path(out))
    return {k: torch.tensor(v["shape"]) for k, v in record["subjects"].items()}


__all__ = ["SynthReport", "SynthScansError", "SynthSubject", "draw_subject", "shape_codes", "skin_colours",
           "subject_heads", "synth_scans"]
