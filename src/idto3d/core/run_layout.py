"""Where every file of a run folder lives: the one place that names them.

The stages write these files (``stages/``), ``evaluate`` and ``view`` read them; both take the names from here,
so the layout is spelled once. The layout is the same as before the code was re-arranged into layers, so run
folders made by earlier versions resume.

```
RUN/config.yaml                 the resolved config (first file written)
RUN/identity.safetensors        the identity embedding (+ RUN/crops/ aligned face crops)
RUN/geometry/                   init.pt, init_report.json, init_<expr>.ply, init_preview.png (initial field),
                                face_fit.json/.pt (face-model fit), head_landmarks.json (offline head), ckpt.pt
                                (+ ckpt.prev.pt), log.jsonl, progress.png,
                                done.json, <expr>.ply/.obj (geometry SDS)
RUN/texture/                    atlas.npz, photo.pt, photo_report.json (photo texture), ckpt.pt, log.jsonl,
                                progress.png, done.json (texture SDS)
RUN/export/                     <expr>.glb/.obj/.mtl/_*.png, done.json, morph/head.glb (+ morph_fit.json)
RUN/renders/                    <expr>_turntable.png/.mp4
RUN/report/                     index.html, metrics.json, plots, viewer/, vendor/three/
RUN/.idto3d/                    manifest.json (the files idto3d wrote, the run's inputs), lock (held by the
                                command working in the folder, with its PID)
```
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

TURNTABLE = "_turntable"  # renders/<expression>_turntable.png/.mp4
TURNTABLE_SUFFIXES = (".png", ".mp4")


@dataclass(frozen=True)
class SDSFiles:
    """The files of one SDS stage's folder."""

    dir: Path

    @property
    def checkpoint(self) -> Path:
        return self.dir / "ckpt.pt"

    @property
    def previous_checkpoint(self) -> Path:
        """The checkpoint before ``checkpoint``, kept so a damaged last one costs one interval, not the run."""
        return self.dir / "ckpt.prev.pt"

    @property
    def log(self) -> Path:
        return self.dir / "log.jsonl"

    @property
    def progress(self) -> Path:
        return self.dir / "progress.png"

    @property
    def done(self) -> Path:
        """Written last: its presence marks the stage finished."""
        return self.dir / "done.json"


# Every name the stages give their files (``RunLayout.named_ours``): a file under one of these is idto3d's even
# when no manifest recorded it (a folder made before manifests, or stages driven from Python without a run held).
_OUR_NAMES = ("config.yaml", "identity.safetensors", "crops/*", ".idto3d/*",
              "geometry/init.pt", "geometry/init_report.json", "geometry/init_preview.png", "geometry/init_*.ply",
              "geometry/face_fit.json", "geometry/face_fit.pt", "geometry/head_landmarks.json", "geometry/ckpt.pt", "geometry/ckpt.prev.pt",
              "geometry/log.jsonl", "geometry/progress.png", "geometry/done.json", "geometry/*.ply", "geometry/*.obj",
              "texture/atlas.npz", "texture/photo.pt", "texture/photo_report.json", "texture/ckpt.pt",
              "texture/ckpt.prev.pt", "texture/log.jsonl", "texture/progress.png", "texture/done.json",
              "export/*.glb", "export/*.obj", "export/*.mtl", "export/*_albedo.png", "export/*_roughness.png",
              "export/*_metallic.png", "export/*_normal.png", "export/done.json", "export/morph/*",
              f"renders/*{TURNTABLE}.png", f"renders/*{TURNTABLE}.mp4",
              "report/index.html", "report/metrics.json", "report/*.png", "report/viewer/*", "report/vendor/*")


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    # ---- top level
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def identity(self) -> Path:
        return self.root / "identity.safetensors"

    @property
    def crops(self) -> Path:
        return self.root / "crops"

    @property
    def geometry(self) -> Path:
        return self.root / "geometry"

    @property
    def texture(self) -> Path:
        return self.root / "texture"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def renders(self) -> Path:
        return self.root / "renders"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def manifest(self) -> Path:
        return self.root / ".idto3d" / "manifest.json"

    @property
    def lock(self) -> Path:
        return self.root / ".idto3d" / "lock"

    def relative(self, path: str | Path) -> str:
        """``path`` (inside the run) relative to the run folder, with ``/``: how reports and metrics name files."""
        return Path(path).relative_to(self.root).as_posix()

    def named_ours(self, rel: str) -> bool:
        """Whether ``rel`` (relative to the run, with ``/``) has a name the stages give their files."""
        return any(fnmatch.fnmatchcase(rel, pattern) for pattern in _OUR_NAMES)

    def from_report(self, path: str | Path) -> str:
        """``path`` (inside the run) as the report page (``report/index.html``) links to it, with ``/``."""
        return Path(os.path.relpath(path, self.report)).as_posix()

    @property
    def derived(self) -> tuple[Path, ...]:
        """The folders computed from the config (what a run that starts over clears)."""
        return self.geometry, self.texture, self.export, self.renders

    # ---- initial geometry (template regression, face-model fit)
    @property
    def init_field(self) -> Path:
        return self.geometry / "init.pt"

    @property
    def init_report(self) -> Path:
        """Written last: its presence marks the initial fit finished."""
        return self.geometry / "init_report.json"

    @property
    def init_preview(self) -> Path:
        return self.geometry / "init_preview.png"

    def init_mesh(self, expression: str) -> Path:
        return self.geometry / f"init_{expression}.ply"

    @property
    def face_fit_json(self) -> Path:
        return self.geometry / "face_fit.json"

    @property
    def head_landmarks(self) -> Path:
        """The offline head's face-model landmarks as vertex indices of the exported meshes."""
        return self.geometry / "head_landmarks.json"

    @property
    def face_fit_tensors(self) -> Path:
        return self.geometry / "face_fit.pt"

    # ---- the SDS stages
    @property
    def geometry_sds(self) -> SDSFiles:
        return SDSFiles(self.geometry)

    @property
    def texture_sds(self) -> SDSFiles:
        return SDSFiles(self.texture)

    def stage_mesh(self, expression: str, suffix: str = ".ply") -> Path:
        return self.geometry / f"{expression}{suffix}"

    # ---- texture
    @property
    def atlas(self) -> Path:
        return self.texture / "atlas.npz"

    @property
    def photo_texture(self) -> Path:
        return self.texture / "photo.pt"

    @property
    def photo_report(self) -> Path:
        """Written last: its presence marks the photo texture finished."""
        return self.texture / "photo_report.json"

    # ---- export and report
    @property
    def export_done(self) -> Path:
        return self.export / "done.json"

    def glb(self, expression: str) -> Path:
        return self.export / f"{expression}.glb"

    @property
    def morph_glb(self) -> Path:
        """All expressions in one file as morph targets (a subfolder: ``export/*.glb`` are the expressions)."""
        return self.export / "morph" / "head.glb"

    @property
    def morph_fit(self) -> Path:
        """How far the fitted morph targets lie from each expression's own surface (SDS path only)."""
        return self.export / "morph" / "morph_fit.json"

    def turntable(self, expression: str, suffix: str = ".png") -> Path:
        return self.renders / f"{expression}{TURNTABLE}{suffix}"

    def turntable_expressions(self) -> list[str]:
        """The expressions that have a turntable (PNG or MP4) in ``renders/``, sorted."""
        return sorted({p.name[: -len(TURNTABLE + suffix)] for suffix in TURNTABLE_SUFFIXES
                       for p in self.renders.glob(f"*{TURNTABLE}{suffix}")})

    @property
    def report_index(self) -> Path:
        return self.report / "index.html"

    @property
    def metrics(self) -> Path:
        return self.report / "metrics.json"

    @property
    def report_viewer(self) -> Path:
        """The report's viewer scripts (viewer.js, boot.js, embedded.js)."""
        return self.report / "viewer"

    @property
    def report_three(self) -> Path:
        """The vendored three.js the viewer imports."""
        return self.report / "vendor" / "three"

    # ---- what each step records
    @property
    def stage_reports(self) -> dict[str, Path]:
        """Each step's finished-marker JSON (it records the step's wall time, ``seconds``), in pipeline order."""
        return {"template_fit": self.init_report, "geometry_sds": self.geometry_sds.done,
                "photo_texture": self.photo_report, "texture_sds": self.texture_sds.done}
