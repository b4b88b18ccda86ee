"""Cameras, rasteriser backends, normal maps and albedo images shared by every stage."""

from idto3d.render.albedo import AlbedoRender, render_albedo, sample_texture
from idto3d.render.antialias_torch import antialias, edge_topology
from idto3d.render.backend import (
    NvdiffrastRasterizer,
    Rasterizer,
    TorchRasterizer,
    available_backends,
    get_rasterizer,
)
from idto3d.render.camera import Camera, orbit_camera, sample_orbit_cameras, view_word
from idto3d.render.fragments import Fragments
from idto3d.render.mesh import Mesh
from idto3d.render.normals import NormalRender, render_normal_map
from idto3d.render.rasterize_torch import interpolate, rasterize

__all__ = [
    "AlbedoRender",
    "Camera",
    "Fragments",
    "Mesh",
    "NormalRender",
    "NvdiffrastRasterizer",
    "Rasterizer",
    "TorchRasterizer",
    "antialias",
    "available_backends",
    "edge_topology",
    "get_rasterizer",
    "interpolate",
    "orbit_camera",
    "rasterize",
    "render_albedo",
    "render_normal_map",
    "sample_orbit_cameras",
    "sample_texture",
    "view_word",
]
