"""Is the generated head the subject? Render it from each photo's fitted camera and compare identities.

The render is the baked albedo under flat light (what the texture holds, no shading added) on white, at the
photo's size; the distance is the identity backend's (dlib offline: Euclidean between unit embeddings, same
person below 0.40), between the render's face and the photo's face.
"""

from __future__ import annotations

import numpy as np
import torch

from idto3d.core.config import IdentityConfig
from idto3d.core.errors import IdtoError
from idto3d.identity.embedder import backend_threshold, identity_distance, make_backend
from idto3d.stages.subject_init import SubjectFit
from idto3d.render.pseudo_albedo import FLAT_LIGHT, render_pseudo_albedo
from idto3d.texture.texture_field import TextureField


@torch.no_grad()
def render_from_photo(person: SubjectFit, photo: int, field: TextureField, expression: int, surface) -> np.ndarray:
    """``[H, W, 3]`` uint8: the head (``surface``: a ``TexturedExpression``) seen by photo ``photo``'s camera."""
    h, w = person.images[photo].shape[:2]
    maps = field.bake(expression, surface.texels)
    out = render_pseudo_albedo(surface.mesh, person.camera(photo), (h, w), maps["albedo"], maps["roughness"],
                               maps["metallic"], FLAT_LIGHT, uv=surface.uv, attribute_faces=surface.attribute_faces,
                               diffuse_only=True)
    return (out.image[0].clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()


def _embedding(backend, image: np.ndarray, what: str) -> np.ndarray:
    faces = backend.detect(image)
    if not faces:
        raise IdtoError(f"no face found in {what}")
    face = max(faces, key=lambda f: f.size)
    return backend.embed(backend.align(image, face))


def identity_distances(person: SubjectFit, field: TextureField, surface, cfg: IdentityConfig,
                       expression: int = 0) -> tuple[list[float], float, list[np.ndarray]]:
    """Per photo: the identity distance between the photo and the head rendered from its camera; the backend's
    same-person threshold; the renders."""
    backend = make_backend(cfg)
    distances, renders = [], []
    for i, image in enumerate(person.images):
        render = render_from_photo(person, i, field, expression, surface)
        a = _embedding(backend, image, f"photo {person.photos[i].name}")
        b = _embedding(backend, render, f"the head rendered from {person.photos[i].name}'s camera")
        distances.append(float(identity_distance(a, b)))
        renders.append(render)
    return distances, backend_threshold(cfg.backend), renders
