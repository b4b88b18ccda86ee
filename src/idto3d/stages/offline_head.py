"""The offline geometry (no normal prior): the fitted face at full resolution, stitched into a smooth head.

Without a normal prior nothing optimises the geometry after the face fit, so the DMTet field is not regressed at
all (that regression exists to give the SDS stage a start; ``stages.initial_geometry`` still does it when a prior
is given). Each run expression's head is built straight from the fit: the face model's mesh with the fitted
shape and that expression (``face_model.offline_expressions.expression_vertices``), placed on the template,
the template decimated into a smooth body and bent onto the face, the two stitched (``geometry.head_stitch``).
All expressions share one topology, so they share one UV layout (``texture.head_atlas``), saved as the run's
atlas (``RunLayout.atlas``: the photo texture and the export then read it as they read the unwrapped field
meshes). ``geometry/<expression>.ply`` holds each head for users.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import torch

from idto3d.core.atomic import atomic_write_text
from idto3d.core.config import Config
from idto3d.core.run_layout import RunLayout
from idto3d.core.run_manifest import check_stage_key
from idto3d.core.stored_files import read_json_file
from idto3d.export.maps import PBRMaps
from idto3d.geometry.face_repair import crumpled_vertices, relax
from idto3d.geometry.hair_shell import shell_offsets
from idto3d.geometry.head_stitch import StitchedHead, build_stitched_head, conform_body, face_mask, pose_head, smooth_body
from idto3d.geometry.mesh_clean import CleanSelection, clean_selection
from idto3d.geometry.mesh_io import save_mesh
from idto3d.geometry.mouth_cavity import MouthStrip, carve_mouth, mouth_strip
from idto3d.render.mesh import Mesh
from idto3d.stages.initial_geometry import resolve_template
from idto3d.stages.offline_hair import scalp_heights
from idto3d.stages.stage_keys import offline_head_key
from idto3d.stages.subject_init import SubjectFit
from idto3d.stages.texture_stage import save_atlases
from idto3d.texture.head_atlas import chart_centre, stitched_atlas
from idto3d.texture.mouth import mouth_weight, paint_mouth
from idto3d.texture.uv_atlas import UVMesh

# (vertices [V, 3], faces, the nose base's vertex) -> [V] height above the photos' hairline, or None: no hair
ScalpHeights = Callable[[np.ndarray, np.ndarray, int], "np.ndarray | None"]
BODY_FACES = 8000  # triangles of the smooth body (after its Loop subdivision)


def stitched_heads(model, shape: torch.Tensor, place, template: Mesh, names: list[str],
                   scalp: ScalpHeights | None = None) -> tuple[dict[str, Mesh], list[UVMesh], np.ndarray, np.ndarray]:
    """The stitched head of every expression in ``names`` (the first one's layout is shared), their UV layouts,
    the face model's 68 landmarks as vertex indices of those layouts (-1: cut away), and the mouth strip
    (``geometry.mouth_cavity``) as layout vertex indices. ``scalp``: each vertex's height above the hairline
    the photos show (``stages.offline_hair``), for a hair shell (``geometry.hair_shell``); None = none."""
    from idto3d.face_model.offline_expressions import expression_vertices

    strip = mouth_strip(model.vertices(shape).detach().double().cpu().numpy(), model.faces.numpy(),
                        model.landmarks.numpy())
    tris = torch.from_numpy(strip.faces)  # the face model's mesh, refined between the lips
    neutral = place(_carved(model.vertices(shape), model, strip))
    smooth = _crumpled_patch(neutral, tris, model)
    faces = {n: _relaxed(place(_carved(expression_vertices(model, shape, n), model, strip)), tris, smooth)
             for n in names}
    neutral = _relaxed(neutral, tris, smooth)
    mask = face_mask(neutral, tris, model.landmarks)
    body = smooth_body(template, BODY_FACES)
    face_mesh = Mesh(neutral, tris)
    layout = build_stitched_head(conform_body(body, face_mesh, mask), face_mesh, mask)
    stitched = {n: pose_head(layout, conform_body(body, Mesh(faces[n], tris), mask, rest=face_mesh), faces[n])
                for n in names}
    if scalp is not None:
        stitched = _with_hair(stitched, layout, scalp, model.landmarks.numpy())
    # One repair, decided on the first (neutral) head and applied to all: the expressions keep one topology.
    cleaned = clean_selection(stitched[names[0]])
    heads = {n: cleaned.apply(m) for n, m in stitched.items()}
    base = stitched_atlas(heads[names[0]], layout, chart_centre(neutral[model.landmarks[30]]), cleaned)
    atlases = [base] + [base.with_positions(heads[n].vertices) for n in names[1:]]
    mouth = _layout_vertices(layout, base, strip.vertices, cleaned)
    return heads, atlases, _layout_vertices(layout, base, model.landmarks.numpy(), cleaned), \
        mouth[mouth >= 0]


def _with_hair(stitched: dict[str, Mesh], layout: StitchedHead, scalp: ScalpHeights, landmarks: np.ndarray
               ) -> dict[str, Mesh]:
    """Every head with the hair shell found on the first (neutral) one; unchanged when the photos show no hair.
    The face's inner part stays (only the body and, by how little of the face they keep, the face's outer band
    move)."""
    first = next(iter(stitched.values()))
    v, f = first.vertices.double().numpy(), first.faces.numpy()
    nose_base = layout.n_body + int(np.searchsorted(layout.face_vertices, landmarks[33]))
    height = scalp(v, f, nose_base)
    if height is None:
        return stitched
    body = np.concatenate([np.ones(layout.n_body), 1.0 - layout.blend])
    offsets = torch.from_numpy(shell_offsets(v, f, height, body)).float()
    return {n: Mesh(m.vertices + offsets, m.faces) for n, m in stitched.items()}


def _carved(vertices: torch.Tensor, model, strip: MouthStrip) -> torch.Tensor:
    """The expression's face on the mesh refined between the lips, its mouth strip pushed back into a cavity
    (``geometry.mouth_cavity``; none in the neutral)."""
    v = carve_mouth(strip.extend(vertices.detach().double().cpu().numpy()), strip, model.landmarks.numpy())
    return torch.from_numpy(v).to(vertices)


def _crumpled_patch(neutral: torch.Tensor, faces: torch.Tensor, model) -> np.ndarray:
    """Where the face model's mesh crumples (``geometry.face_repair``): the nostril wings and the eyelids'
    borders, within half the nose's width of the nose-base and eye landmarks (iBUG 30-47). Found on the neutral
    and applied to every expression, so all keep one patch."""
    v = neutral.detach().double().cpu().numpy()
    lm = v[model.landmarks.numpy()]
    width = float(np.linalg.norm(lm[31] - lm[35]))
    return crumpled_vertices(v, faces.cpu().numpy(), lm[30:48], 0.5 * width)


def _relaxed(vertices: torch.Tensor, faces: torch.Tensor, patch: np.ndarray) -> torch.Tensor:
    out = relax(vertices.detach().double().cpu().numpy(), faces.cpu().numpy(), patch)
    return torch.from_numpy(out).to(vertices)


def _layout_vertices(layout: StitchedHead, atlas: UVMesh, ids: np.ndarray, cleaned: CleanSelection
                     ) -> np.ndarray:
    """The face model's vertices ``ids`` as vertex indices of ``atlas`` (-1: cut away)."""
    head_id = np.full(ids.shape, -1, np.int64)
    pos = np.searchsorted(layout.face_vertices, ids)
    found = (pos < layout.face_vertices.size) & (layout.face_vertices[np.minimum(pos, layout.face_vertices.size - 1)]
                                                 == ids)
    head_id[found] = layout.n_body + pos[found]
    head_id = cleaned.vertex_of(head_id)
    first = np.full(int(atlas.vmapping.max()) + 1, -1, np.int64)
    first[atlas.vmapping[::-1]] = np.arange(atlas.vmapping.size)[::-1]  # the first layout vertex of each
    return np.where(head_id >= 0, first[np.maximum(head_id, 0)], -1)


def ensure_offline_heads(run_dir, cfg: Config, subject: SubjectFit) -> dict[str, Mesh]:
    """Build the offline heads, save them (``geometry/<expression>.ply``), their atlas (``texture/atlas.npz``,
    which the photo texture and the export read) and where the landmarks are (``geometry/head_landmarks.json``,
    with the step's key, ``stages.stage_keys.offline_head_key``). Rebuilt on every call (seconds, deterministic);
    files already in the run are kept (a resumed run keeps its texels), and only when they were made from the
    same photos and settings (else ``StaleOutputError``, before anything is built)."""
    layout = RunLayout(run_dir)
    key = offline_head_key(cfg, subject.photos)
    if layout.atlas.exists() and layout.head_landmarks.exists():
        check_stage_key(layout.head_landmarks, read_json_file(layout.head_landmarks), key, layout.root)
    scalp = scalp_heights(subject) if cfg.template.hair_shell else None
    heads, atlases, landmarks, mouth = stitched_heads(subject.model, subject.fit.shape, subject.place,
                                                      resolve_template(cfg), list(cfg.expressions), scalp)
    for name, mesh in heads.items():
        if not layout.stage_mesh(name).exists():
            save_mesh(mesh, layout.stage_mesh(name))
    if not layout.atlas.exists():  # else: a resumed run keeps its atlas and what was said of it
        atomic_write_text(layout.head_landmarks, json.dumps({
            "about": "the face model's 68 landmarks (iBUG order) as vertex indices of export/<expression>.glb/.obj; "
                     "-1 where the face was cut", "vertices": landmarks.tolist(),
            "mouth": {"about": "the vertices between the inner lips that open into the mouth cavity "
                               "(geometry.mouth_cavity), as vertex indices of the same files",
                      "vertices": mouth.tolist()},
            "key": key}))
        save_atlases(layout.atlas, dict(zip(heads, atlases)))  # last: its presence marks the step done
    return heads


def mouth_maps(run_dir, maps: PBRMaps, atlas: UVMesh) -> PBRMaps:
    """``maps`` of the offline heads with the mouth strip recorded in ``geometry/head_landmarks.json`` coloured
    as the mouth's inside (``texture.mouth``); unchanged for a run without one (not offline, or older)."""
    path = RunLayout(run_dir).head_landmarks
    strip = read_json_file(path).get("mouth") if path.exists() else None
    if not strip or not strip["vertices"]:
        return maps
    weight = mouth_weight(atlas, np.asarray(strip["vertices"], np.int64), maps.albedo.shape[0])
    albedo, roughness = paint_mouth(maps.albedo, maps.roughness, weight)
    return PBRMaps.create(albedo, roughness, maps.metallic, maps.normal)
