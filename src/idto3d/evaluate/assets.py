"""A run's exported heads, loaded back for evaluation.

The exported ``.glb`` (``idto3d.export.gltf``) is what a user takes away, so that is what we measure: not
the run's internal fields. It is read with trimesh and turned back into the renderer's inputs: a welded
``Mesh`` in working-space units (metres / ``METRES_PER_UNIT``; centred, as the export centres the bounding
box), per-corner UVs with OpenGL's bottom-left origin (trimesh undoes glTF's ``1 - v``) and the PBR maps
(albedo sRGB, roughness and metallic from the packed texture's G and B channels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from idto3d.core.errors import IdtoError
from idto3d.core.run_layout import RunLayout
from idto3d.export.maps import PBRMaps
from idto3d.core.units import METRES_PER_UNIT
from idto3d.identity.photos import IMAGE_SUFFIXES
from idto3d.render.mesh import Mesh


@dataclass(frozen=True)
class ExportedHead:
    """One exported expression, ready for ``render_pseudo_albedo``.

    ``mesh``: welded positions (working space) and faces; ``uv`` float32 ``[V', 2]`` and ``attribute_faces``
    int64 ``[F, 3]`` index the seam-split UV vertices (``UVMesh.render_inputs``' convention); ``maps``: the
    material, row 0 at the top of the texture image.
    """

    name: str
    path: Path
    mesh: Mesh
    uv: torch.Tensor
    attribute_faces: torch.Tensor
    maps: PBRMaps


def _texture(image: object, what: str, path: Path) -> np.ndarray:
    if not isinstance(image, Image.Image):
        raise IdtoError(f"{path} has no {what} texture; evaluate needs a head exported by `idto3d generate`")
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def load_exported_head(glb: str | Path, metres_per_unit: float = METRES_PER_UNIT) -> ExportedHead:
    """Load ``glb`` (written by ``idto3d.export.write_glb``) back into renderer inputs. Raises ``IdtoError``."""
    import trimesh

    path = Path(glb)
    if not path.is_file():
        raise IdtoError(f"exported head not found: {path}")
    try:
        scene = trimesh.load(path, force="scene", process=False)
    except Exception as exc:  # trimesh raises many types for malformed files
        raise IdtoError(f"{path} is not a readable glTF binary ({type(exc).__name__}: {exc}); re-export the run "
                        "with `idto3d generate`") from None
    meshes = list(scene.geometry.values())
    if len(meshes) != 1 or not isinstance(meshes[0], trimesh.Trimesh) or len(meshes[0].faces) == 0:
        raise IdtoError(f"{path} must hold exactly one triangle mesh, found {len(meshes)} geometries")
    tm = meshes[0]
    uv = getattr(tm.visual, "uv", None)
    material = getattr(tm.visual, "material", None)
    if uv is None or material is None or len(uv) != len(tm.vertices):
        raise IdtoError(f"{path} has no UV-mapped material; evaluate needs a textured head from `idto3d generate`")
    albedo = _texture(getattr(material, "baseColorTexture", None), "base colour", path)
    mr = _texture(getattr(material, "metallicRoughnessTexture", None), "metallic-roughness", path)
    maps = PBRMaps.create(albedo, mr[..., 1], mr[..., 2])

    # glTF splits vertices along UV seams; the seam copies have identical positions, so welding them by
    # exact position gives back the closed surface (smooth shading normals across seams).
    positions = np.asarray(tm.vertices, dtype=np.float32)
    welded, inverse = np.unique(positions, axis=0, return_inverse=True)
    faces = np.asarray(tm.faces, dtype=np.int64)
    mesh = Mesh(torch.from_numpy(np.ascontiguousarray(welded / np.float32(metres_per_unit))),
                torch.from_numpy(inverse.reshape(-1)[faces]))
    return ExportedHead(path.stem, path, mesh, torch.from_numpy(np.asarray(uv, dtype=np.float32)),
                        torch.from_numpy(faces), maps)


def run_expressions(run_dir: Path) -> list[str]:
    """The expressions named in the run's ``config.yaml``, in order."""
    config = RunLayout(run_dir).config
    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise IdtoError(f"cannot read {config}: {exc}") from None
    names = data.get("expressions") if isinstance(data, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise IdtoError(f"{config} has no list of expressions; is {run_dir} a folder made by `idto3d generate`?")
    return names


def run_heads(run_dir: str | Path) -> dict[str, Path]:
    """``{expression: RUN/export/<expression>.glb}`` in the order of the run's config. Raises ``IdtoError``
    when the folder is missing or empty, is not a run, or has not been exported yet."""
    layout = RunLayout(run_dir)
    run_dir = layout.root
    if not run_dir.exists():
        raise IdtoError(f"run folder not found: {run_dir}")
    if not run_dir.is_dir():
        if run_dir.suffix.lower() in IMAGE_SUFFIXES:  # `--references refs/*.jpg`: the shell's 2nd photo lands here
            raise IdtoError(f"{run_dir} is a photo, not a run folder: give each reference with its own "
                            "--references (-r a.jpg -r b.jpg), a quoted glob (-r 'refs/*.jpg') or a folder")
        raise IdtoError(f"{run_dir} is a file; give a run folder made by `idto3d generate`")
    if not any(run_dir.iterdir()):
        raise IdtoError(f"run folder {run_dir} is empty; make a run with `idto3d generate PHOTOS --out {run_dir}`")
    if not layout.config.is_file():
        raise IdtoError(f"{run_dir} is not a run folder (no {layout.config.name}); give a folder made by "
                        "`idto3d generate`")
    names = run_expressions(run_dir)
    heads = {n: layout.glb(n) for n in names}
    missing = [n for n, p in heads.items() if not p.is_file()]
    export = layout.relative(layout.export)
    if len(missing) == len(names):
        raise IdtoError(f"{run_dir} has no exported heads ({export}/*.glb); run `idto3d generate` first (re-running "
                        "the same command finishes an interrupted run)")
    if missing:
        raise IdtoError(f"{run_dir} lacks the export of expression(s) {', '.join(missing)} ({export}/<name>.glb); "
                        "re-run the same `idto3d generate` command to finish the export")
    return heads
