"""The fitted face's crumpled patches (the nostril wings fold over themselves and render as speckles) are
relaxed in place: no sharp fold is left there, nothing else moves, the topology stays (morph targets and the UV
layout are built on it), and smooth relief is not taken for a crumple."""

from __future__ import annotations

import numpy as np
import trimesh

from idto3d.geometry.face_repair import CRUMPLE_DEGREES, crumpled_vertices, relax


def _sheet(n: int = 41) -> tuple[np.ndarray, np.ndarray]:
    """An 8 cm square sheet (0.4 head units), a vertex grid of ``n`` x ``n`` (2 mm apart)."""
    g = np.linspace(-0.2, 0.2, n)
    x, y = np.meshgrid(g, g)
    v = np.stack([x.ravel(), y.ravel(), np.zeros(n * n)], 1)
    i = np.arange(n * n).reshape(n, n)
    a, b, c, d = i[:-1, :-1].ravel(), i[:-1, 1:].ravel(), i[1:, 1:].ravel(), i[1:, :-1].ravel()
    return v, np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])


def _max_dihedral(v: np.ndarray, f: np.ndarray, where: np.ndarray) -> float:
    mesh = trimesh.Trimesh(v, f, process=False)
    edges = mesh.face_adjacency_edges
    inside = where[edges].all(1)
    return float(np.degrees(mesh.face_adjacency_angles[inside]).max())


def _crumpled(v: np.ndarray) -> np.ndarray:
    """A zig-zag of up to +-4 mm over a 1.2 cm disc round the origin: neighbouring triangles fold sharply."""
    out = v.copy()
    r = np.linalg.norm(v[:, :2], axis=1)
    k = np.round(v[:, 0] / 0.01).astype(int) + np.round(v[:, 1] / 0.01).astype(int)
    out[:, 2] += np.where(r < 0.06, 0.02 * np.where(k % 2 == 0, 1.0, -1.0) * (1 - r / 0.06), 0.0)
    return out


def test_a_crumpled_patch_is_relaxed_and_nothing_else_moves():
    flat, faces = _sheet()
    v = _crumpled(flat)
    patch = crumpled_vertices(v, faces, np.zeros((1, 3)), radius=0.1)
    before = _max_dihedral(v, faces, patch)
    out = relax(v, faces, patch)
    after = _max_dihedral(out, faces, patch)
    print(f"patch of {int(patch.sum())} vertices: sharpest fold {before:.0f} -> {after:.0f} degrees")
    assert before > CRUMPLE_DEGREES and after < 30.0
    assert out.shape == v.shape
    np.testing.assert_array_equal(out[~patch], v[~patch])
    assert np.abs(out[patch, 2]).max() < 0.5 * np.abs(v[patch, 2]).max()  # flattened, not blown up


def test_only_crumples_near_the_given_points_are_taken():
    flat, faces = _sheet()
    v = _crumpled(flat)
    far = crumpled_vertices(v, faces, np.array([[0.19, 0.19, 0.0]]), radius=0.05)
    assert not far.any()


def test_smooth_relief_is_not_a_crumple():
    flat, faces = _sheet()
    v = flat.copy()
    v[:, 2] = 0.03 * np.exp(-(v[:, :2] ** 2).sum(1) / 0.05 ** 2)  # a 6 mm bump, like a nose bridge
    assert not crumpled_vertices(v, faces, np.zeros((1, 3)), radius=0.2).any()
