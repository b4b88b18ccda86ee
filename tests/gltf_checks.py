"""Checks every exported .glb must pass: the Khronos glTF validator, trimesh and pygltflib with its textures."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pygltflib
import pytest
import trimesh
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
VALIDATOR_SCRIPT = ROOT / "tests" / "tools" / "validate_gltf.mjs"
VALIDATOR_PKG = ROOT / ".ci" / "node" / "node_modules" / "gltf-validator"


def validate_glb(path: Path) -> dict:
    """The validator's JSON report (skips the test where node or the validator is missing)."""
    node = shutil.which("node")
    if node is None or not VALIDATOR_PKG.is_dir():
        pytest.skip(
            "glTF validator not installed: run `npm install --no-save --prefix .ci/node "
            "gltf-validator@2.0.0-dev.3.10` (needs node + npm; .ci/run does it)"
        )
    out = subprocess.run([node, str(VALIDATOR_SCRIPT), str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def png_texture(gltf: pygltflib.GLTF2, texture_index: int) -> np.ndarray:
    image = gltf.images[gltf.textures[texture_index].source]
    view = gltf.bufferViews[image.bufferView]
    blob = gltf.binary_blob()
    assert image.mimeType == "image/png"
    return np.asarray(Image.open(io.BytesIO(blob[view.byteOffset : view.byteOffset + view.byteLength])))


def check_exported_glb(path: Path) -> dict[str, np.ndarray]:
    """Loads in trimesh (with a textured PBR material) and pygltflib, and has zero validator errors.
    Returns the base colour and metallic-roughness textures."""
    scene = trimesh.load(path, process=False)
    (tm,) = scene.geometry.values()
    assert len(tm.faces) > 0 and tm.visual.uv is not None and tm.visual.material.baseColorTexture is not None
    gltf = pygltflib.GLTF2().load(str(path))
    pbr = gltf.materials[0].pbrMetallicRoughness
    maps = {"albedo": png_texture(gltf, pbr.baseColorTexture.index),
            "metallic_roughness": png_texture(gltf, pbr.metallicRoughnessTexture.index)}
    report = validate_glb(path)
    assert report["issues"]["numErrors"] == 0, report["issues"]["messages"]
    return maps
