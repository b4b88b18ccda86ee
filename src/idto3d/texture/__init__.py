"""Appearance (paper section 3.4): UV texel maps and the expression-conditioned texture field."""

from __future__ import annotations

from idto3d.texture.texture_field import MIN_ROUGHNESS, TextureField, build_texture_field, texture_parameter_groups
from idto3d.texture.texels import TexelMap, scatter_texels, texel_map

__all__ = [
    "MIN_ROUGHNESS",
    "TexelMap",
    "TextureField",
    "build_texture_field",
    "scatter_texels",
    "texel_map",
    "texture_parameter_groups",
]
