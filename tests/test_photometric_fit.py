"""Photometric refinement of the face fit (``face_model.photometric_fit``): on a synthetic photo (a known face
shape rendered by our renderer under a known SH light, with noisy landmarks), the refined shape is closer to the
truth than the landmark fit alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from idto3d.core.config import Config, FaceModelConfig
from idto3d.core.errors import IdtoError
from idto3d.face_model.landmark_fit import PhotoFit, fit_photos, weak_perspective_camera
from idto3d.face_model.morphable_model import load_morphable_model
from idto3d.face_model.photometric_fit import refine_fit
from idto3d.render.backend import TorchRasterizer
from idto3d.render.mesh import Mesh
from idto3d.render.normals import render_normal_map
from idto3d.render.pbr import linear_to_srgb, sh9_irradiance
from idto3d.stages.stage_keys import offline_head_key, photo_texture_key

SIZE = 256
CFG = FaceModelConfig(photometric_resolution=128, photometric_rounds=3, photometric_iterations=30)


def _rotation(yaw_deg: float, pitch_deg: float) -> torch.Tensor:
    a, b = math.radians(yaw_deg), math.radians(pitch_deg)
    ry = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    rx = torch.tensor([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return (rx @ ry).float()


def key_light() -> torch.Tensor:
    """``[9, 3]`` SH radiance in camera space: ambient plus a warm key from the upper left front."""
    sh = torch.zeros(9, 3)
    sh[0] = 0.8 / 0.282095
    d = torch.nn.functional.normalize(torch.tensor([-0.5, 0.45, 0.75]), dim=0)
    sh[1:4] = 0.9 / (0.488603 * 2.0 / 3.0) * torch.stack([d[1], d[2], d[0]])[:, None]
    sh[6] = 0.15
    return sh


@pytest.fixture(scope="module")
def model():
    return load_morphable_model(None)


@pytest.fixture(scope="module")
def synthetic(model):
    return make_synthetic(model)


def make_synthetic(model, noise_px: float = 1.5, shape_std: float = 1.2, yaw_deg: float = 18.0, seed: int = 7):
    """A photo of a known face (shape, pose, light, constant skin albedo) and its landmarks with 1.5 px noise."""
    g = torch.Generator().manual_seed(seed)
    shape = torch.randn(model.num_shape, generator=g) * shape_std
    truth = PhotoFit(rotation=_rotation(yaw_deg, -6.0), scale=230.0, translation=torch.tensor([128.0, 120.0]),
                     expression=torch.zeros(model.num_expression), landmarks=np.zeros((68, 2), np.float32),
                     rms_px=0.0, image_size=(SIZE, SIZE))
    verts = model.vertices(shape)
    normals = render_normal_map(Mesh(verts, model.faces), weak_perspective_camera(truth), SIZE,
                                rasterizer=TorchRasterizer())
    mask = normals.fragments.mask[0, ..., None]
    albedo = torch.tensor([0.62, 0.45, 0.36])
    lit = albedo * sh9_irradiance(key_light(), normals.normals[0]) / math.pi
    image = torch.where(mask, linear_to_srgb(lit.clamp(0, 1)), torch.tensor([0.25, 0.3, 0.35]))
    photo = (image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
    landmarks = truth.project(model.landmark_points(shape)).numpy()
    landmarks = landmarks + noise_px * torch.randn(landmarks.shape, generator=g).numpy()
    return shape, photo, landmarks.astype(np.float32)


def _aligned_rmse_mm(model, fitted: torch.Tensor, truth: torch.Tensor) -> float:
    """Vertex RMSE (mm) over the front of the face (within 6 cm of the nose tip), after the best similarity
    transform (one photo cannot fix the head's size and depth)."""
    a = model.vertices(fitted).double()
    b = model.vertices(truth).double()
    front = (b - b[model.landmarks[30]]).norm(dim=1) < 0.3
    a, b = a[front], b[front]
    ma, mb = a.mean(0), b.mean(0)
    u, s, vt = torch.linalg.svd((b - mb).T @ (a - ma))
    d = torch.ones(3, dtype=torch.float64)
    d[2] = torch.sign(torch.det(u @ vt))
    rot = u @ torch.diag(d) @ vt
    scale = (s * d).sum() / ((a - ma) ** 2).sum()
    moved = scale * (a - ma) @ rot.T + mb
    return float(((moved - b) ** 2).sum(1).mean().sqrt()) * 200.0  # 1 unit = 0.2 m


def test_refinement_recovers_shape_better_than_landmarks(model, synthetic):
    shape, photo, landmarks = synthetic
    fit = fit_photos(model, [landmarks], [photo.shape[:2]], CFG)
    refined, report = refine_fit(model, fit, [photo], CFG)
    before = _aligned_rmse_mm(model, fit.shape, shape)
    after = _aligned_rmse_mm(model, refined.shape, shape)
    print(f"vertex rmse: landmarks {before:.2f} mm, refined {after:.2f} mm; median skin residual "
          f"{report.residual_before[0]:.4f} -> {report.residual_after[0]:.4f}")
    assert report.pixels[0] > 2000
    assert report.residual_after[0] < 0.8 * report.residual_before[0]
    assert after < 0.75 * before
    # the landmarks still hold (the landmark energy is a term of the refinement)
    assert refined.photos[0].rms_px < 3.0


def test_refinement_is_deterministic(model, synthetic):
    _, photo, landmarks = synthetic
    cfg = FaceModelConfig(photometric_resolution=64, photometric_rounds=1, photometric_iterations=5)
    fit = fit_photos(model, [landmarks], [photo.shape[:2]], cfg)
    a, _ = refine_fit(model, fit, [photo], cfg)
    b, _ = refine_fit(model, fit, [photo], cfg)
    assert torch.equal(a.shape, b.shape)
    assert torch.equal(a.photos[0].rotation, b.photos[0].rotation)


def test_photometric_settings_are_in_the_stage_keys(tmp_path):
    photo = tmp_path / "p.png"
    photo.write_bytes(b"x")
    on, off = Config(), Config()
    off.face_model.photometric = False
    assert offline_head_key(on, [photo]) != offline_head_key(off, [photo])
    assert photo_texture_key(on, [photo], {}) != photo_texture_key(off, [photo], {})


def test_the_local_mesh_gives_the_whole_meshs_normals_at_the_pixels(model):
    """Each step evaluates only the triangles around the visible pixels' corners (``_local``); their vertex
    normals there must be the whole mesh's."""
    from idto3d.face_model.photometric_fit import _local, _vertex_normals

    verts = model.vertices(torch.randn(model.num_shape, generator=torch.Generator().manual_seed(3))).double()
    corners = model.faces[torch.arange(20000, 21000)]
    ids, faces, local_corners = _local(model.faces, corners)
    assert ids.numel() < verts.shape[0] // 4
    whole = _vertex_normals(verts, model.faces)[corners]
    local = _vertex_normals(verts[ids], faces)[local_corners]
    assert torch.allclose(local, whole, atol=1e-12)


def test_two_photos_refine_one_shape(model):
    """Photos of one face from both sides: the shared shape is refined from both (each its own pose)."""
    shape, left, lm_left = make_synthetic(model, yaw_deg=-25.0, seed=11)
    _, right, lm_right = make_synthetic(model, yaw_deg=20.0, seed=11)
    cfg = FaceModelConfig(photometric_resolution=128, photometric_rounds=3, photometric_iterations=30)
    fit = fit_photos(model, [lm_left, lm_right], [left.shape[:2], right.shape[:2]], cfg)
    refined, report = refine_fit(model, fit, [left, right], cfg)
    assert len(report.pixels) == 2 and min(report.pixels) > 500
    before, after = _aligned_rmse_mm(model, fit.shape, shape), _aligned_rmse_mm(model, refined.shape, shape)
    print(f"two photos: vertex rmse landmarks {before:.2f} mm, refined {after:.2f} mm")
    assert after < 0.9 * before
    assert all(a < b for a, b in zip(report.residual_after, report.residual_before))
    with pytest.raises(IdtoError, match="2 photos for a fit of 1"):
        refine_fit(model, fit_photos(model, [lm_left], [left.shape[:2]], cfg), [left, right], cfg)
