"""examples/miniature_metrics.py on tiny meshes with known answers: the face box, the face-region Chamfer, and the
table's own / start / other-subject / other-expression comparisons."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from idto3d.render.mesh import Mesh

_SPEC = importlib.util.spec_from_file_location(
    "miniature_metrics", Path(__file__).parents[1] / "examples" / "miniature_metrics.py")
mm = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(mm)

N = 41  # grid vertices per side over [-1, 1]^2


def _grid(bump=None) -> tuple[np.ndarray, np.ndarray]:
    """A flat square z = 0, with ``bump(x, y) -> z`` added (the "face" part of a subject)."""
    x, y = np.meshgrid(np.linspace(-1, 1, N), np.linspace(-1, 1, N))
    z = np.zeros_like(x) if bump is None else bump(x, y)
    v = np.stack([x, y, z], -1).reshape(-1, 3)
    idx = np.arange(N * N).reshape(N, N)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    f = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])
    return v, f


def _mesh(bump=None) -> Mesh:
    v, f = _grid(bump)
    return Mesh(torch.tensor(v, dtype=torch.float32), torch.tensor(f, dtype=torch.int64))


def _plateau(h: float):
    """Height ``h`` on |x|, |y| <= 0.3 (the face), falling to 0 by 0.35 (one grid step); 0 elsewhere."""
    return lambda x, y: h * np.clip((0.35 - np.maximum(abs(x), abs(y))) / 0.05, 0, 1)


def test_face_box_bounds_the_vertices_that_move_most_between_scans():
    lo, hi = mm.face_box([_mesh(), _mesh(_plateau(0.1)), _mesh(_plateau(-0.05))], margin=0.02)
    # Moved: the grid vertices with max(|x|, |y|) < 0.35 -> the ring at 0.30 is the outermost (spacing 0.05).
    torch.testing.assert_close(lo, torch.tensor([-0.32, -0.32, -0.07]))
    torch.testing.assert_close(hi, torch.tensor([0.32, 0.32, 0.12]))
    # A small move elsewhere (under a quarter of the largest) does not widen the box.
    far = _mesh(lambda x, y: _plateau(0.1)(x, y) + 0.01 * (x > 0.8))
    torch.testing.assert_close(mm.face_box([_mesh(), far], margin=0.0)[1][:2], torch.tensor([0.3, 0.3]))
    with pytest.raises(ValueError, match="do not differ"):
        mm.face_box([_mesh(), _mesh()])


def test_region_chamfer_reads_the_face_gap_that_the_whole_surface_dilutes():
    flat, lifted = _mesh(), _mesh(_plateau(0.02))
    box = (torch.tensor([-0.3, -0.3, -1.0]), torch.tensor([0.3, 0.3, 1.0]))
    face, whole = mm.region_cd(flat, lifted, box), mm.cd(flat, lifted)
    assert face == pytest.approx(0.02, rel=0.02)  # inside the box the two surfaces are 0.02 apart everywhere
    assert whole < 0.25 * face  # most of the square is shared
    # Surfaces that differ only outside the box: no face gap.
    outside = _mesh(lambda x, y: 0.1 * (x > 0.8))
    assert mm.region_cd(flat, outside, box) == pytest.approx(0.0, abs=1e-6)
    assert mm.cd(flat, outside) > 0.005


def _write(path: Path, mesh: Mesh) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    trimesh.Trimesh(mesh.vertices.numpy(), mesh.faces.numpy(), process=False).export(path)


def test_table_compares_each_result_with_its_own_subject_start_others_and_expressions(tmp_path):
    # Subjects 000, 001 (train) and 002 (held out), each in neutral (000) and mouth_open (020): a plateau whose
    # height is the subject's, plus 0.03 in mouth_open.
    heights = {"000": 0.05, "001": -0.04, "002": 0.12}
    for s, h in heights.items():
        root = tmp_path / ("heldout" if s == "002" else "scans")
        for e, extra in (("000", 0.0), ("020", 0.03)):
            _write(root / s / e / "scan.ply", _mesh(_plateau(h + extra)))
    geo = tmp_path / "runs" / "id" / "002" / "geometry"
    # The result: most of the way from the flat template to subject 002's heads.
    for name, extra in (("neutral", 0.0), ("mouth_open", 0.03)):
        _write(geo / f"{name}.ply", _mesh(_plateau(0.11 + extra)))
        _write(geo / f"init_{name}.ply", _mesh())
        # A run whose expression codes changed nothing: both expressions the same mesh.
        still = tmp_path / "runs" / "still" / "002" / "geometry"
        _write(still / f"{name}.ply", _mesh(_plateau(0.11)))
        _write(still / f"init_{name}.ply", _mesh())
    out = mm.main(tmp_path)
    rows = {r["expression"]: r for r in out["rows"] if r["variant"] == "id"}
    assert set(rows) == {"neutral", "mouth_open"}
    n = rows["neutral"]
    assert n["face_own"] == pytest.approx(0.01, rel=0.25) and n["face_start"] == pytest.approx(0.12, rel=0.25)
    assert n["face_gain"] == pytest.approx(1 - n["face_own"] / n["face_start"]) and n["face_gain"] > 0.85
    assert n["face_others"]["000"] == pytest.approx(0.06, rel=0.25)
    assert n["face_others"]["001"] == pytest.approx(0.15, rel=0.25)
    assert n["face_own_other_expressions"]["mouth_open"] == pytest.approx(0.04, rel=0.25)
    assert n["face_own"] > n["own"] > 0  # the whole square dilutes the face gap
    for r in rows.values():
        assert r["closer_than_others"] and r["face_closer_than_others"]
        assert r["face_closer_than_other_expressions"]
    s = out["summary"]["id"]
    assert s["rows"] == 2 and s["face_closer_than_others"] == 1.0 and s["face_mean_gain"] > 0.85
    # The result's expressions are as far apart as the truth's (0.03); the still run's not at all.
    assert n["face_expression_move"]["mouth_open"] == pytest.approx(1.0, rel=0.1)
    assert s["face_expression_move"] == pytest.approx(1.0, rel=0.1)
    assert out["summary"]["still"]["face_expression_move"] == pytest.approx(0.0, abs=1e-6)
    assert (tmp_path / "metrics.json").is_file()


def test_figure_puts_each_held_out_head_next_to_its_ground_truth(tmp_path):
    from PIL import Image

    spec = importlib.util.spec_from_file_location(
        "miniature_figure", Path(__file__).parents[1] / "examples" / "miniature_figure.py")
    fig = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fig)
    sphere = trimesh.creation.icosphere(2, radius=0.6)
    for name in ("heldout/002/000/scan.ply", "runs/id/002/geometry/neutral.ply",
                 "runs/id/002/geometry/init_neutral.ply"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        sphere.export(tmp_path / name)
    page = fig.main(tmp_path).read_text()
    assert "figure.png" in page and "002 neutral" in page
    img = np.asarray(Image.open(tmp_path / "figure.png"))
    # One row (002 neutral), 5 columns x 2 views; the missing ID-off and oracle runs are left blank (white).
    assert img.shape[:2] == (fig.SIZE + 2, 10 * (fig.SIZE + 2))
    tiles = [img[:fig.SIZE, k * (fig.SIZE + 2):k * (fig.SIZE + 2) + fig.SIZE] for k in range(10)]
    assert all((t < 250).any() for k, t in enumerate(tiles) if k not in (4, 5, 6, 7))  # a head is drawn
    assert all((t >= 254).all() for t in tiles[4:8])


def test_seeds_are_grouped_and_rows_reused_only_while_their_inputs_are_the_same(tmp_path, monkeypatch):
    for s, h in {"000": 0.05, "001": -0.04, "002": 0.12}.items():
        _write(tmp_path / ("heldout" if s == "002" else "scans") / s / "000" / "scan.ply", _mesh(_plateau(h)))
    for variant, h in (("id", 0.11), ("id.s1", 0.06), ("no_id", 0.0)):
        geo = tmp_path / "runs" / variant / "002" / "geometry"
        _write(geo / "neutral.ply", _mesh(_plateau(h)))
        _write(geo / "init_neutral.ply", _mesh())
    assert mm.split_seed("id.s12") == ("id", 12) and mm.split_seed("no_id") == ("no_id", 0)
    out = mm.main(tmp_path)
    assert set(out["summary"]) == {"id", "id.s1", "no_id"} and set(out["seeds"]) == {"id"}
    g, per = out["seeds"]["id"], out["summary"]
    assert g["seeds"] == [0, 1]
    gains = [per["id"]["face_mean_gain"], per["id.s1"]["face_mean_gain"]]
    assert g["face_mean_gain"] == {"mean": pytest.approx(sum(gains) / 2), "min": min(gains), "max": max(gains)}
    assert g["face_closer_than_others"]["min"] == 0.0 and g["face_closer_than_others"]["max"] == 1.0

    calls = []
    real = mm._row
    monkeypatch.setattr(mm, "_row", lambda *a: calls.append(a[0]) or real(*a))
    assert mm.main(tmp_path)["rows"] == out["rows"] and calls == []  # nothing changed: every row reused
    _write(tmp_path / "runs" / "id.s1" / "002" / "geometry" / "neutral.ply", _mesh(_plateau(0.12)))
    again = mm.main(tmp_path)
    assert calls == ["id.s1"]  # only the changed result is measured again
    assert next(r for r in again["rows"] if r["variant"] == "id.s1")["face_own"] < 0.005
    before = next(r for r in again["rows"] if r["variant"] == "no_id")["face_others"]["000"]
    _write(tmp_path / "scans" / "000" / "000" / "scan.ply", _mesh(_plateau(0.04)))
    after = next(r for r in mm.main(tmp_path)["rows"] if r["variant"] == "no_id")["face_others"]["000"]
    assert sorted(calls[1:]) == ["id", "id.s1", "no_id"]  # a ground truth changed: every row again
    # ... against the scan as it is now, not one kept from the last call: the flat result moved 0.05 -> 0.04 away
    assert after < before
