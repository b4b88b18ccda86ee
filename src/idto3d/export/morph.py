"""One ``.glb`` with every expression as a morph target (blend shape) of the first one.

The base mesh is the first expression (normally ``neutral``) exactly as its own ``.glb`` writes it; each other
expression is one morph target holding POSITION and NORMAL deltas on the same vertices, so
``base + delta == that expression's .glb positions`` (each file is centred on its own bounding box, and so are
the deltas). The targets are named in ``mesh.extras.targetNames`` (three.js reads it into
``morphTargetDictionary``; Blender imports them as shape keys) and start at weight 0. The material is the base
expression's: one texture set for all shapes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pygltflib as g

from idto3d.core.atomic import atomic_write_bytes
from idto3d.core.errors import IdtoError
from idto3d.core.units import METRES_PER_UNIT
from idto3d.export.gltf import _add_geometry, _add_images, _Blob, document_bytes
from idto3d.export.maps import PBRMaps
from idto3d.export.placement import metric_positions, smooth_normals
from idto3d.texture.uv_atlas import UVMesh


def same_layout(a: UVMesh, b: UVMesh) -> bool:
    """Whether ``b`` is another pose of ``a``: same faces, UVs and vertex count (what a morph target needs)."""
    return (a.vertices.shape == b.vertices.shape and np.array_equal(a.faces, b.faces)
            and np.array_equal(a.uvs, b.uvs))


def _add_target(blob: _Blob, base: UVMesh, pose: UVMesh, metres_per_unit: float,
                offset: np.ndarray | None) -> dict[str, int]:
    d_pos = metric_positions(pose, metres_per_unit) - metric_positions(base, metres_per_unit)
    if offset is not None:
        d_pos = d_pos + (np.asarray(offset, np.float64) * metres_per_unit).astype(np.float32)
    d_pos = np.ascontiguousarray(d_pos, dtype=np.float32)
    d_nrm = np.ascontiguousarray(smooth_normals(pose) - smooth_normals(base))
    return {"POSITION": blob.vectors(d_pos, g.VEC3, bounds=True), "NORMAL": blob.vectors(d_nrm, g.VEC3)}


def morph_glb_bytes(base: UVMesh, poses: dict[str, UVMesh], maps: PBRMaps,
                    metres_per_unit: float = METRES_PER_UNIT, name: str = "head",
                    offsets: dict[str, np.ndarray] | None = None) -> bytes:
    """The ``.glb`` bytes: ``base`` with one morph target per entry of ``poses`` (in order). ``offsets`` (model
    units, per pose): added to a pose after centring it, e.g. to centre a fitted pose on its expression's box."""
    for expr, pose in poses.items():
        if not same_layout(base, pose):
            raise IdtoError(f"morph target {expr!r} does not share the base mesh's vertices/faces/UVs")
    blob = _Blob()
    primitive = _add_geometry(blob, base, metres_per_unit, with_tangents=maps.normal is not None)
    offsets = offsets or {}
    primitive.targets = [_add_target(blob, base, pose, metres_per_unit, offsets.get(n)) for n, pose in poses.items()]
    images = _add_images(blob, maps)
    names = list(poses)
    mesh = g.Mesh(name=name, primitives=[primitive], weights=[0.0] * len(names), extras={"targetNames": names})
    return document_bytes(blob, mesh, images, maps, name)


def write_morph_glb(path: str | Path, base: UVMesh, poses: dict[str, UVMesh], maps: PBRMaps,
                    metres_per_unit: float = METRES_PER_UNIT, offsets: dict[str, np.ndarray] | None = None) -> Path:
    """Write the morph ``.glb`` atomically; returns the path."""
    path = Path(path)
    return atomic_write_bytes(path, morph_glb_bytes(base, poses, maps, metres_per_unit, path.stem, offsets))
