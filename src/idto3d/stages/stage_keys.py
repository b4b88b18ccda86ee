"""The key of each non-SDS stage's output (``core.run_manifest.stage_key``): what produced it, recorded in its
finished-marker and compared before it is reused. The SDS stages tie their checkpoints to their conditioning in
``stages.sds_runner`` (identity, prompt) and ``stages.texture_stage`` (the meshes)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from idto3d import __version__
from idto3d.core.config import Config
from idto3d.core.run_manifest import file_digest, json_digest, stage_key
from idto3d.render.mesh import Mesh

NO_PHOTOS = "none"


def config_digest(cfg: Config, *sections: str) -> str:
    """A digest of the config sections (or keys: ``geometry.field``) a stage reads."""
    return json_digest({s: _plain(_get(cfg, s)) for s in sections})


def _get(cfg: object, dotted: str) -> object:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _plain(value: object) -> object:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def photos_digest(photos: Sequence[Path] | None) -> str:
    """The photos' contents (in order); ``none`` when the stage did not use photos."""
    return json_digest([file_digest(Path(p)) for p in photos]) if photos else NO_PHOTOS


def meshes_digest(meshes: Mapping[str, Mesh]) -> str:
    h = hashlib.sha256()
    for name, m in meshes.items():
        h.update(name.encode())
        h.update(m.vertices.detach().float().cpu().contiguous().numpy().tobytes())
        h.update(m.faces.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def template_fit_key(cfg: Config, photos: Sequence[Path] | None) -> dict[str, str]:
    """The initial field: regressed to the template, or to the face fitted to ``photos``."""
    return stage_key(photos=photos_digest(photos),
                     # the field's architecture, not the SDS settings that follow it
                     config=config_digest(cfg, "seed", "expressions", "template", "face_model",
                                          "geometry.grid_resolution", "geometry.grid_scale", "geometry.encoding",
                                          "geometry.field"),
                     version=__version__)


def offline_head_key(cfg: Config, photos: Sequence[Path] | None) -> dict[str, str]:
    """The offline heads (``stages.offline_head``): the face fitted to ``photos``, stitched into the template,
    one per expression."""
    return stage_key(photos=photos_digest(photos),
                     config=config_digest(cfg, "seed", "expressions", "template", "face_model"),
                     version=__version__)


def photo_texture_key(cfg: Config, photos: Sequence[Path], meshes: Mapping[str, Mesh]) -> dict[str, str]:
    return stage_key(photos=photos_digest(photos), upstream=meshes_digest(meshes),
                     config=config_digest(cfg, "seed", "expressions", "texture", "photo_texture", "face_model"),
                     version=__version__)


def export_key(cfg: Config, source: Mapping[str, object] | None, meshes: Mapping[str, Mesh]) -> dict[str, str]:
    """The export: its settings, and what it bakes (the texture's own marker, or the bare meshes)."""
    return stage_key(upstream=json_digest([source, meshes_digest(meshes)]),
                     config=config_digest(cfg, "expressions", "export"), version=__version__)
