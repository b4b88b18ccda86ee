"""Render-ready export: UV atlas (xatlas), binary glTF with a PBR material, OBJ/MTL with PNG maps.

Export convention: metres, +Y up, the face looks along +Z, right-handed, the mesh's bounding box
centred at the origin; UV origin bottom-left (OpenGL), flipped to top-left inside the ``.glb``.
"""

from __future__ import annotations

import re
from pathlib import Path

from idto3d.core.errors import IdtoError
from idto3d.export.gltf import glb_bytes, write_glb
from idto3d.export.maps import MapError, PBRMaps
from idto3d.export.obj import write_obj
from idto3d.texture.uv_atlas import UnwrapError, UVMesh, shared_atlas, unwrap
from idto3d.core.units import METRES_PER_UNIT

__all__ = [
    "MapError",
    "PBRMaps",
    "UVMesh",
    "UnwrapError",
    "export_expression",
    "glb_bytes",
    "shared_atlas",
    "unwrap",
    "write_glb",
    "write_obj",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def export_expression(
    out_dir: str | Path, name: str, uv_mesh: UVMesh, maps: PBRMaps, metres_per_unit: float = METRES_PER_UNIT
) -> dict[str, Path]:
    """Write ``out_dir/NAME.glb`` plus ``NAME.obj``/``.mtl`` and ``NAME_*.png``; returns the paths by kind."""
    if not _NAME.match(name):
        raise IdtoError(f"expression name {name!r} is not a safe file name; use letters, digits, '_', '-' or '.'")
    out_dir = Path(out_dir)
    written = {"glb": write_glb(out_dir / f"{name}.glb", uv_mesh, maps.albedo, maps.roughness, maps.metallic,
                                maps.normal, metres_per_unit)}
    written.update(write_obj(out_dir / f"{name}.obj", uv_mesh, maps, metres_per_unit))
    return written
