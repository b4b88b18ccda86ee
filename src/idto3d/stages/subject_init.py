"""Subject-fitted initialisation: a morphable face fitted to the photos, merged into the head template.

The paper starts SDS from a generic FLAME head; with photos we start closer to the subject. The face model is
fitted jointly to the 68 dlib landmarks of every photo the identity used (shared shape; per-photo pose and
expression), its neutral face places it on the built-in template (``geometry.face_merge``), and each run
expression gets a target head: the fitted shape with that expression's coefficients (``morphable.expressions``;
neutral = none) merged into the template. The geometry field is regressed to these targets
(``initial_geometry.ensure_init``), so every later stage starts from the subject's face. The fit is saved in
``geometry/face_fit.json`` (what users read) and ``geometry/face_fit.pt`` (tensors: shape, per-photo pose,
expression and the placement), and the photos' cameras are rebuilt from it for the photo texture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from idto3d.core.atomic import atomic_torch_save, atomic_write_text
from idto3d.core.config import Config
from idto3d.core.errors import IdtoError
from idto3d.core.run_layout import RunLayout
from idto3d.geometry.face_merge import Similarity, border_falloff, merge_face, placement
from idto3d.identity.io import IdentityEmbedding
from idto3d.identity.photos import load_photo
from idto3d.stages.initial_geometry import resolve_template
from idto3d.render.camera import Camera
from idto3d.render.mesh import Mesh

FALLOFF_WIDTH = 0.12  # working-space units (2.4 cm) over which the face blends into the template


@dataclass
class SubjectFit:
    model: object                 # morphable.model.MorphableModel
    fit: object                   # morphable.fit.FaceFit
    place: Similarity             # model space -> template working space
    photos: list[Path]            # the photos fitted, in order
    images: list[np.ndarray]      # their pixels (upright RGB)

    def camera(self, i: int) -> Camera:
        """Photo ``i``'s fitted camera, for heads in the template's working space."""
        from idto3d.face_model.landmark_fit import weak_perspective_camera

        return camera_after(weak_perspective_camera(self.fit.photos[i]), self.place)


def camera_after(camera: Camera, place: Similarity) -> Camera:
    """``camera`` (which saw model space) seeing the same pixels of points moved by ``place``."""
    inv = torch.eye(4)
    r_t = place.rotation.T / place.scale
    inv[:3, :3] = r_t
    inv[:3, 3] = -r_t @ place.translation
    fields = dict(camera.__dict__)
    fields["view"] = camera.view @ inv
    fields["eye"] = place(camera.eye)
    return Camera(**fields)


def used_photos(ident: IdentityEmbedding) -> list[tuple[Path, np.ndarray]]:
    """``(path, face box)`` of each photo the identity used; empty when the photo files are not at hand."""
    out = []
    for i, rec in enumerate(ident.photos):
        if not bool(ident.used[i]):
            continue
        path = Path(str(rec.get("path", "")))
        if not path.is_file():
            return []
        out.append((path, ident.boxes[i].numpy()))
    return out


def fit_subject(run_dir: Path, cfg: Config, ident: IdentityEmbedding, console: Console | None = None
                ) -> SubjectFit | None:
    """Fit the face model to the identity's photos (None when the photos are not available, e.g. a run
    started from an identity file whose photos were moved)."""
    from idto3d.face_model.landmark_fit import fit_photos
    from idto3d.face_model.landmarks import detect_landmarks68
    from idto3d.face_model.morphable_model import load_morphable_model

    photos = used_photos(ident)
    if not photos:
        return None
    model = load_morphable_model(cfg.face_model.path)
    images = [load_photo(p) for p, _ in photos]
    landmarks = [detect_landmarks68(img, box) for img, (_, box) in zip(images, photos)]
    fit = fit_photos(model, landmarks, [img.shape[:2] for img in images], cfg.face_model, seed=cfg.seed)
    shading = None
    if cfg.face_model.photometric:
        from idto3d.face_model.photometric_fit import refine_fit

        fit, shading = refine_fit(model, fit, images, cfg.face_model)
    place = placement(fit.neutral_vertices(model), model.landmarks)
    layout = RunLayout(run_dir)
    atomic_torch_save(layout.face_fit_tensors, {
        "shape": fit.shape, "place_scale": torch.tensor(place.scale), "place_rotation": place.rotation,
        "place_translation": place.translation,
        "photos": [{"rotation": p.rotation, "scale": torch.tensor(p.scale), "translation": p.translation,
                    "expression": p.expression} for p in fit.photos]})
    atomic_write_text(layout.face_fit_json, json.dumps({
        "model": model.name, "licence": model.licence,
        "photos": [{"path": str(path), "rms_px": round(float(p.rms_px), 3), "image_size": list(p.image_size)}
                   for (path, _), p in zip(photos, fit.photos)],
        "shape_norm": round(float(fit.shape.norm()), 4), "placement_scale": round(place.scale, 4),
        "photometric": None if shading is None else {
            "median_residual_linear_before": [round(v, 5) for v in shading.residual_before],
            "median_residual_linear_after": [round(v, 5) for v in shading.residual_after],
            "skin_pixels": shading.pixels}},
        indent=2))
    if console is not None:
        rms = ", ".join(f"{p.rms_px:.1f}" for p in fit.photos)
        console.print(f"face fit ({model.name}): landmark error {rms} px", highlight=False)
        if shading is not None:
            before = ", ".join(f"{v:.4f}" for v in shading.residual_before)
            after = ", ".join(f"{v:.4f}" for v in shading.residual_after)
            console.print(f"photometric refinement: median skin residual {before} -> {after} (linear RGB)",
                          highlight=False)
    return SubjectFit(model, fit, place, [p for p, _ in photos], images)


def subject_targets(subject: SubjectFit, cfg: Config) -> list[Mesh]:
    """One closed target head per run expression: the fitted face (with that expression) merged into the
    template."""
    from idto3d.face_model.offline_expressions import expression_coefficients

    model, fit = subject.model, subject.fit
    template = resolve_template(cfg)
    faces = model.faces
    weights = border_falloff(subject.place(fit.neutral_vertices(model)), faces, FALLOFF_WIDTH)
    targets = []
    for name in cfg.expressions:
        coeffs = None if name == "neutral" else expression_coefficients(model, name)
        verts = subject.place(model.vertices(fit.shape, coeffs))
        targets.append(merge_face(template, Mesh(verts, faces), weights))
    return targets


def subject_for_run(run_dir: Path, cfg: Config, ident: IdentityEmbedding, console: Console | None = None
                    ) -> SubjectFit | None:
    """The run's face-model fit (``fit_subject``); None when ``face_model.enabled`` is off or the photos are not
    at hand. Refuses a user template first: the face is placed by the built-in template's landmarks."""
    if not cfg.face_model.enabled:
        return None
    check_template_for_subject(cfg)
    return fit_subject(run_dir, cfg, ident, console)


def check_template_for_subject(cfg: Config) -> None:
    if cfg.template.path not in (None, "", "builtin"):
        raise IdtoError("the subject-fitted initialisation places the face on the built-in template, whose facial "
                        "landmarks are known; with template.path set, pass --set face_model.enabled=false "
                        "to start from your template without the face fit")
