"""Rasteriser backends behind one interface: our PyTorch rasteriser, or nvdiffrast on CUDA.

Both take OpenGL clip-space vertices ``[B, V, 4]`` (or ``[V, 4]``) and int faces ``[F, 3]``,
and return / accept images with row 0 at the TOP.
"""

from __future__ import annotations

import importlib.util
import weakref
from typing import Protocol

import torch

from idto3d.core.errors import IdtoError
from idto3d.render import antialias_torch, rasterize_torch
from idto3d.render.fragments import Fragments, batched_clip, parse_resolution

BACKENDS = ("torch", "nvdiffrast")


class Rasterizer(Protocol):
    name: str

    def rasterize(self, clip_vertices: torch.Tensor, faces: torch.Tensor,
                  resolution: int | tuple[int, int]) -> Fragments: ...

    def interpolate(self, attributes: torch.Tensor, fragments: Fragments, faces: torch.Tensor) -> torch.Tensor: ...

    def antialias(self, color: torch.Tensor, fragments: Fragments, clip_vertices: torch.Tensor,
                  faces: torch.Tensor) -> torch.Tensor: ...


class TorchRasterizer:
    """Pure PyTorch; runs anywhere (CPU or GPU), see ``rasterize_torch``."""

    name = "torch"

    def __init__(self, cull_backfaces: bool = False, max_candidates: int = 1 << 22):
        self.cull_backfaces = cull_backfaces
        self.max_candidates = max_candidates

    def rasterize(self, clip_vertices: torch.Tensor, faces: torch.Tensor,
                  resolution: int | tuple[int, int]) -> Fragments:
        return rasterize_torch.rasterize(clip_vertices, faces, resolution, self.cull_backfaces, self.max_candidates)

    def interpolate(self, attributes: torch.Tensor, fragments: Fragments, faces: torch.Tensor) -> torch.Tensor:
        return rasterize_torch.interpolate(attributes, fragments, faces)

    def antialias(self, color: torch.Tensor, fragments: Fragments, clip_vertices: torch.Tensor,
                  faces: torch.Tensor) -> torch.Tensor:
        return antialias_torch.antialias(color, fragments, clip_vertices, faces)


class NvdiffrastRasterizer:
    """nvdiffrast's CUDA rasteriser (``RasterizeCudaContext``), adapted to our conventions.

    nvdiffrast's images have row 0 at the BOTTOM (y_ndc = -1): we flip rows on the way out
    and flip colours back on the way into ``antialias``. Its ``rast`` channels are
    (u, v, z/w, triangle_id + 1) with u weighting vertex 0, v vertex 1 and 1 - u - v vertex 2,
    the same order as our ``bary``. It works in float32 and int32 triangles.
    """

    name = "nvdiffrast"

    def __init__(self, device: torch.device | str | None = None):
        try:
            import nvdiffrast.torch as dr
        except ImportError as exc:
            raise IdtoError(
                "the nvdiffrast backend was requested but nvdiffrast is not installed "
                f"({exc}); install it on a CUDA machine "
                "(pip install git+https://github.com/NVlabs/nvdiffrast) or use the 'torch' backend"
            ) from None
        if not torch.cuda.is_available():
            raise IdtoError("the nvdiffrast backend needs a CUDA GPU; use the 'torch' backend on this machine")
        self._dr = dr
        self.device = torch.device(device) if device is not None else torch.device("cuda")
        self._ctx = dr.RasterizeCudaContext(device=self.device)
        self._tri_cache: tuple[weakref.ref, int, torch.Tensor] | None = None
        self._hash_cache: tuple[weakref.ref, int, object] | None = None

    def _tri(self, faces: torch.Tensor, device: torch.device) -> torch.Tensor:
        cached = self._tri_cache
        if cached is not None and cached[0]() is faces and cached[1] == faces._version and cached[2].device == device:
            return cached[2]
        tri = faces.to(device=device, dtype=torch.int32).contiguous()
        self._tri_cache = (weakref.ref(faces), faces._version, tri)
        return tri

    def _topology_hash(self, faces: torch.Tensor, tri: torch.Tensor) -> object:
        cached = self._hash_cache
        if cached is not None and cached[0]() is faces and cached[1] == faces._version:
            return cached[2]
        h = self._dr.antialias_construct_topology_hash(tri)
        self._hash_cache = (weakref.ref(faces), faces._version, h)
        return h

    @staticmethod
    def _pos(clip_vertices: torch.Tensor) -> torch.Tensor:
        return batched_clip(clip_vertices).float().contiguous()

    def rasterize(self, clip_vertices: torch.Tensor, faces: torch.Tensor,
                  resolution: int | tuple[int, int]) -> Fragments:
        H, W = parse_resolution(resolution)
        pos = self._pos(clip_vertices)
        rast, _ = self._dr.rasterize(self._ctx, pos, self._tri(faces, pos.device), resolution=[H, W])
        top_first = rast.flip(1)
        triangle_id = top_first[..., 3].round().long() - 1
        mask = (triangle_id >= 0).unsqueeze(-1)
        u, v = top_first[..., 0], top_first[..., 1]
        bary = torch.stack([u, v, 1.0 - u - v], -1) * mask
        depth = torch.where(mask[..., 0], top_first[..., 2], torch.full_like(u, float("inf")))
        return Fragments(triangle_id=triangle_id, bary=bary, depth=depth, pixels=rast)

    def interpolate(self, attributes: torch.Tensor, fragments: Fragments, faces: torch.Tensor) -> torch.Tensor:
        # A 3-D attribute tensor selects nvdiffrast's instanced mode; [1, V, C] broadcasts.
        attr = (attributes if attributes.dim() == 3 else attributes.unsqueeze(0)).float().contiguous()
        out, _ = self._dr.interpolate(attr, fragments.pixels, self._tri(faces, attr.device))
        return out.flip(1)

    def antialias(self, color: torch.Tensor, fragments: Fragments, clip_vertices: torch.Tensor,
                  faces: torch.Tensor) -> torch.Tensor:
        pos = self._pos(clip_vertices)
        tri = self._tri(faces, pos.device)
        if pos.shape[0] != color.shape[0]:
            pos = pos.expand(color.shape[0], -1, -1).contiguous()
        out = self._dr.antialias(color.float().flip(1).contiguous(), fragments.pixels, pos, tri,
                                 topology_hash=self._topology_hash(faces, tri))
        return out.flip(1)


def _nvdiffrast_importable() -> bool:
    try:
        return importlib.util.find_spec("nvdiffrast") is not None
    except (ImportError, ValueError):
        return False


def available_backends() -> list[str]:
    """Backends usable on this machine: always "torch"; "nvdiffrast" with CUDA and the package."""
    names = ["torch"]
    if torch.cuda.is_available() and _nvdiffrast_importable():
        names.append("nvdiffrast")
    return names


def get_rasterizer(name: str = "auto", device: torch.device | str | None = None) -> Rasterizer:
    """The rasteriser called ``name``; "auto" prefers nvdiffrast for CUDA devices when installed.

    ``device`` is where the meshes will live (``None``: CUDA if this machine has it). The stages pass
    ``idto3d.core.device.rasterizer_name(render.backend, runtime.fast_paths)``, so with fast paths off (the
    default) "auto" there is the torch rasteriser, the reference.
    """
    if name not in ("auto", *BACKENDS):
        raise IdtoError(f"unknown rasterizer {name!r}; choose one of: auto, {', '.join(BACKENDS)}")
    if name == "torch":
        return TorchRasterizer()
    if name == "nvdiffrast":
        if device is not None and torch.device(device).type != "cuda":
            raise IdtoError(f"the nvdiffrast backend renders on CUDA devices only, and this run's device is "
                            f"{torch.device(device)}; set render.backend to torch (or auto)")
        return NvdiffrastRasterizer(device)
    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if on_cuda and "nvdiffrast" in available_backends():
        return NvdiffrastRasterizer(device)
    return TorchRasterizer()
