"""Binary glTF 2.0 (``.glb``) with a metallic-roughness PBR material, written with pygltflib.

One node, one mesh, one triangle primitive with POSITION (metres, centred), NORMAL (smooth, unit),
TEXCOORD_0 and uint32 indices; the material references baseColorTexture (sRGB PNG),
metallicRoughnessTexture (G = roughness, B = metallic, linear) and optionally normalTexture
(tangent space, with a TANGENT attribute from ``placement.tangents`` so viewers need not guess).
glTF's UV origin is the image's top-left, ours is bottom-left, so ``v`` is written as ``1 - v``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pygltflib as g

from idto3d.core.atomic import atomic_write_bytes
from idto3d.export.maps import PBRMaps, albedo_png, metallic_roughness_png, normal_png
from idto3d.export.placement import metric_positions, smooth_normals, tangents
from idto3d.texture.uv_atlas import UVMesh
from idto3d.core.units import METRES_PER_UNIT


class _Blob:
    """The GLB binary chunk: buffer views appended at 4-byte aligned offsets, and the accessors into them."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.views: list[g.BufferView] = []
        self.accessors: list[g.Accessor] = []

    def add(self, payload: bytes, target: int | None = None) -> int:
        self.data.extend(b"\x00" * (-len(self.data) % 4))
        self.views.append(g.BufferView(buffer=0, byteOffset=len(self.data), byteLength=len(payload), target=target))
        self.data.extend(payload)
        return len(self.views) - 1

    def accessor(self, payload: bytes, target: int, component: int, count: int, kind: str) -> g.Accessor:
        acc = g.Accessor(bufferView=self.add(payload, target), componentType=component, count=count, type=kind)
        self.accessors.append(acc)
        return acc

    def vectors(self, arr: np.ndarray, kind: str, bounds: bool = False) -> int:
        """A float vertex attribute; its index among the accessors."""
        acc = self.accessor(arr.tobytes(), g.ARRAY_BUFFER, g.FLOAT, len(arr), kind)
        if bounds:  # required for POSITION
            acc.min, acc.max = arr.min(0).tolist(), arr.max(0).tolist()
        return len(self.accessors) - 1

    def indices(self, idx: np.ndarray) -> int:
        self.accessor(idx.tobytes(), g.ELEMENT_ARRAY_BUFFER, g.UNSIGNED_INT, idx.size, g.SCALAR)
        return len(self.accessors) - 1


def _add_geometry(blob: _Blob, uv_mesh: UVMesh, metres_per_unit: float, with_tangents: bool) -> g.Primitive:
    """Vertex attributes and indices into ``blob``; the triangle primitive that uses them (material 0)."""
    pos = metric_positions(uv_mesh, metres_per_unit)
    nrm = smooth_normals(uv_mesh)
    # glTF's v runs down the image, ours up.
    uv = np.ascontiguousarray(np.stack([uv_mesh.uvs[:, 0], 1.0 - uv_mesh.uvs[:, 1]], axis=1), dtype=np.float32)
    idx = np.ascontiguousarray(uv_mesh.faces.astype(np.uint32))
    a_pos = blob.vectors(pos, g.VEC3, bounds=True)
    a_nrm = blob.vectors(nrm, g.VEC3)
    a_uv = blob.vectors(uv, g.VEC2)
    a_tan = blob.vectors(tangents(uv_mesh, nrm), g.VEC4) if with_tangents else None
    a_idx = blob.indices(idx)
    return g.Primitive(attributes=g.Attributes(POSITION=a_pos, NORMAL=a_nrm, TANGENT=a_tan, TEXCOORD_0=a_uv),
                       indices=a_idx, material=0, mode=g.TRIANGLES)


def _add_images(blob: _Blob, maps: PBRMaps) -> list[g.Image]:
    """Base colour, metallic-roughness and (if any) normal map as PNGs in ``blob``, in the material's order."""
    pngs = [albedo_png(maps), metallic_roughness_png(maps)] + ([normal_png(maps)] if maps.normal is not None else [])
    return [g.Image(bufferView=blob.add(p), mimeType="image/png") for p in pngs]


def _material(name: str, with_normal_map: bool) -> g.Material:
    return g.Material(
        name=f"{name}_material",
        pbrMetallicRoughness=g.PbrMetallicRoughness(
            baseColorFactor=[1.0, 1.0, 1.0, 1.0],
            baseColorTexture=g.TextureInfo(index=0),
            metallicFactor=1.0,  # factors multiply the texture: 1 means "the texture as is"
            roughnessFactor=1.0,
            metallicRoughnessTexture=g.TextureInfo(index=1),
        ),
        normalTexture=g.NormalMaterialTexture(index=2, scale=1.0) if with_normal_map else None,
        alphaMode=g.OPAQUE,
        doubleSided=False,
    )


def glb_bytes(uv_mesh: UVMesh, maps: PBRMaps, metres_per_unit: float = METRES_PER_UNIT, name: str = "head") -> bytes:
    """The ``.glb`` file's bytes (see the module docstring for what it contains)."""
    blob = _Blob()
    # The binary chunk's layout is vertex data, indices, then images: keep this order (the bytes depend on it).
    primitive = _add_geometry(blob, uv_mesh, metres_per_unit, with_tangents=maps.normal is not None)
    images = _add_images(blob, maps)
    return document_bytes(blob, g.Mesh(name=name, primitives=[primitive]), images, maps, name)


def document_bytes(blob: _Blob, mesh: g.Mesh, images: list[g.Image], maps: PBRMaps, name: str) -> bytes:
    """The ``.glb`` of one node holding ``mesh`` (its data and ``images`` already in ``blob``), material 0."""
    gltf = g.GLTF2(
        asset=g.Asset(version="2.0", generator="idto3d"),
        scene=0,
        scenes=[g.Scene(nodes=[0])],
        nodes=[g.Node(mesh=0, name=name)],
        meshes=[mesh],
        materials=[_material(name, with_normal_map=maps.normal is not None)],
        textures=[g.Texture(sampler=0, source=i) for i in range(len(images))],
        images=images,
        samplers=[
            g.Sampler(
                magFilter=g.LINEAR, minFilter=g.LINEAR_MIPMAP_LINEAR, wrapS=g.CLAMP_TO_EDGE, wrapT=g.CLAMP_TO_EDGE
            )
        ],
        accessors=blob.accessors,
        bufferViews=blob.views,
        buffers=[g.Buffer(byteLength=len(blob.data))],
    )
    gltf.set_binary_blob(bytes(blob.data))
    return b"".join(gltf.save_to_bytes())


def write_glb(
    path: str | Path,
    uv_mesh: UVMesh,
    albedo,  # noqa: ANN001 - [H, W, 3] array or tensor in [0, 1]
    roughness,  # noqa: ANN001 - [H, W]
    metallic,  # noqa: ANN001 - [H, W]
    normal_map=None,  # noqa: ANN001 - optional [H, W, 3] tangent-space normals in [-1, 1]
    metres_per_unit: float = METRES_PER_UNIT,
) -> Path:
    """Write ``uv_mesh`` with its PBR maps as a ``.glb`` (atomically). Returns the path."""
    maps = PBRMaps.create(albedo, roughness, metallic, normal_map)
    path = Path(path)
    return atomic_write_bytes(path, glb_bytes(uv_mesh, maps, metres_per_unit, name=path.stem))
