"""Cameras, rasteriser backends, normal maps, albedo images and PBR shading shared by every stage."""

from idto3d.render.albedo import AlbedoRender, render_albedo, sample_texture
from idto3d.render.antialias_torch import antialias, edge_topology
from idto3d.render.backend import NvdiffrastRasterizer, Rasterizer, TorchRasterizer, available_backends, get_rasterizer
from idto3d.render.camera import Camera, orbit_camera, sample_orbit_cameras, view_word
from idto3d.render.envmap import (
    EnvironmentMap, EnvMapError, load_envmap, load_envmap_folder, procedural_envmap, random_envmap, rotate_y,
    save_hdr, studio_envmap,
)
from idto3d.render.fragments import Fragments
from idto3d.render.mesh import Mesh
from idto3d.render.normals import NormalRender, render_normal_map
from idto3d.render.pbr import PBRRender, linear_to_srgb, prefilter_envmap, render_pbr, shade_pbr
from idto3d.render.rasterize_torch import interpolate, rasterize

__all__ = [
    "AlbedoRender",
    "Camera",
    "EnvMapError",
    "EnvironmentMap",
    "Fragments",
    "Mesh",
    "NormalRender",
    "NvdiffrastRasterizer",
    "PBRRender",
    "Rasterizer",
    "TorchRasterizer",
    "antialias",
    "available_backends",
    "edge_topology",
    "get_rasterizer",
    "interpolate",
    "linear_to_srgb",
    "load_envmap",
    "load_envmap_folder",
    "orbit_camera",
    "prefilter_envmap",
    "procedural_envmap",
    "random_envmap",
    "rasterize",
    "render_albedo",
    "render_normal_map",
    "render_pbr",
    "rotate_y",
    "sample_orbit_cameras",
    "sample_texture",
    "save_hdr",
    "shade_pbr",
    "studio_envmap",
    "view_word",
]
