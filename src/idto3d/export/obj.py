"""Wavefront OBJ + MTL + PNG maps, for tools without glTF support.

Same frame as the ``.glb`` (metres, centred, +Y up, facing +Z). OBJ's UV origin is bottom-left
like ours, so ``vt`` is written unflipped. The MTL gives the albedo as ``map_Kd`` and the PBR
extension keys (``Pr``/``map_Pr`` roughness, ``Pm``/``map_Pm`` metallic, ``norm`` normal map)
that Blender, three.js and tinyobjloader read. Files are written atomically, maps first and the
``.obj`` last, so an ``.obj`` on disk always has its ``.mtl`` and maps beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from idto3d.core.atomic import atomic_write_bytes, atomic_write_text
from idto3d.export.maps import PBRMaps, albedo_png, normal_png, png_bytes, to_uint8
from idto3d.export.placement import metric_positions, smooth_normals
from idto3d.texture.uv_atlas import UVMesh
from idto3d.core.units import METRES_PER_UNIT


def _rows(prefix: str, arr: np.ndarray) -> str:
    fmt = prefix + " " + " ".join(["%.6f"] * arr.shape[1])
    return "\n".join(fmt % tuple(r) for r in arr.tolist())


def write_obj(
    path: str | Path,
    uv_mesh: UVMesh,
    maps: PBRMaps,
    metres_per_unit: float = METRES_PER_UNIT,
) -> dict[str, Path]:
    """Write ``NAME.obj``, ``NAME.mtl`` and ``NAME_{albedo,roughness,metallic[,normal]}.png``.

    Returns the written paths keyed ``obj``, ``mtl``, ``albedo``, ``roughness``, ``metallic``
    (and ``normal``).
    """
    path = Path(path)
    stem, folder = path.stem, path.parent
    pos = metric_positions(uv_mesh, metres_per_unit)
    nrm = smooth_normals(uv_mesh)

    written: dict[str, Path] = {}
    written["albedo"] = atomic_write_bytes(folder / f"{stem}_albedo.png", albedo_png(maps))
    written["roughness"] = atomic_write_bytes(folder / f"{stem}_roughness.png", png_bytes(to_uint8(maps.roughness)))
    written["metallic"] = atomic_write_bytes(folder / f"{stem}_metallic.png", png_bytes(to_uint8(maps.metallic)))
    if maps.normal is not None:
        written["normal"] = atomic_write_bytes(folder / f"{stem}_normal.png", normal_png(maps))

    material = f"{stem}_material"
    mtl = [
        f"newmtl {material}",
        "Ka 0 0 0",
        "Kd 1 1 1",
        "Ks 0 0 0",
        "d 1",
        "illum 2",
        f"map_Kd {written['albedo'].name}",
        "Pr 1",
        f"map_Pr {written['roughness'].name}",
        "Pm 1",
        f"map_Pm {written['metallic'].name}",
    ]
    if "normal" in written:
        mtl.append(f"norm {written['normal'].name}")
    written["mtl"] = atomic_write_text(folder / f"{stem}.mtl", "\n".join(mtl) + "\n")

    f1 = uv_mesh.faces + 1  # OBJ indices are 1-based; v, vt and vn share one index per corner
    faces = "\n".join("f {0}/{0}/{0} {1}/{1}/{1} {2}/{2}/{2}".format(*r) for r in f1.tolist())
    obj = "\n".join(
        [
            "# idto3d export: metres, +Y up, facing +Z, centred",
            f"mtllib {written['mtl'].name}",
            f"o {stem}",
            _rows("v", pos),
            _rows("vt", uv_mesh.uvs),
            _rows("vn", nrm),
            f"usemtl {material}",
            "s 1",
            faces,
        ]
    )
    written["obj"] = atomic_write_text(path, obj + "\n")
    return written
