"""Claims about the prior fine-tuning data builder: layout, prompts, colours, resume, determinism, errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from idto3d.cli import app
from idto3d.core.config import CameraConfig
from idto3d.core.expressions import EXPRESSION_NAMES
from idto3d.priors.training.render_dataset import (
    DatasetBuildError, age_group, build_render_dataset, make_prompt, read_expression_names, read_subject_metadata,
    SubjectInfo,
)
from idto3d.priors.training.scans import axis_rotation, load_scan

RED, GREEN, BLUE = (220, 30, 30), (30, 200, 40), (40, 50, 210)


def _head(scale=(0.09, 0.12, 0.1)) -> trimesh.Trimesh:
    """A head-sized ellipsoid in 'scanner units' (metres, off-centre), facing +Z."""
    m = trimesh.creation.icosphere(subdivisions=3)
    m.vertices = m.vertices * np.array(scale) + np.array([0.3, 1.6, -0.2])
    return m


def _vertex_coloured(path: Path, colour, scale=(0.09, 0.12, 0.1)) -> None:
    m = _head(scale)
    m.visual.vertex_colors = np.tile([*colour, 255], (len(m.vertices), 1)).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    m.export(path)


def _textured(path: Path, colour) -> None:
    m = _head()
    uv = (m.vertices[:, :2] - m.vertices[:, :2].min(0)) / np.ptp(m.vertices[:, :2], 0)
    img = Image.new("RGB", (16, 16), colour)
    m.visual = trimesh.visual.TextureVisuals(uv=uv, image=img)
    path.parent.mkdir(parents=True, exist_ok=True)
    m.export(path)  # OBJ + MTL + PNG beside it


def make_scans(root: Path) -> Path:
    """2 subjects x 2 expressions: vertex colours (PLY) and one UV-textured OBJ."""
    _vertex_coloured(root / "000" / "000" / "scan.ply", RED)
    _vertex_coloured(root / "000" / "002" / "scan.ply", RED, scale=(0.09, 0.13, 0.1))
    _textured(root / "017" / "000" / "scan.obj", GREEN)
    _vertex_coloured(root / "017" / "001" / "scan.ply", BLUE)
    return root


def write_metadata(path: Path, rows=(("0", "F", "25", "Caucasian"), ("17", "male", "elderly", "Asian"))) -> Path:
    path.write_text("subject,gender,age,ethnicity,notes\n" + "".join(",".join(r) + ",x\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("renders")
    scans = make_scans(tmp / "scans")
    meta = write_metadata(tmp / "subjects.csv")
    ids = tmp / "ids"
    ids.mkdir()
    for s in ("000", "017"):
        save_file({"embedding": torch.nn.functional.normalize(torch.randn(128), dim=0)}, ids / f"{s}.safetensors")
    out = tmp / "out"
    report = build_render_dataset(scans, out, meta, views=3, resolution=32, seed=5, identities=ids, progress=False)
    return tmp, scans, meta, ids, out, report


def _index(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]


def test_every_scan_view_and_domain_gets_an_image_and_a_record(built):
    _, _, _, _, out, report = built
    records = _index(out)
    assert report.images == len(records) == 4 * 3 * 2 and report.rendered == 24 and report.skipped == 0
    assert {r["domain"] for r in records} == {"normal", "albedo"}
    cam = CameraConfig()
    for r in records:
        img = Image.open(out / r["image"])
        assert img.size == (32, 32) and img.mode == "RGB"
        assert r["image"].startswith(f"{r['domain']}/{r['subject']}_{r['expression_id']}_")
        c = r["camera"]
        assert cam.elevation_deg[0] <= c["elevation"] <= cam.elevation_deg[1]
        assert cam.radius[0] <= c["radius"] <= cam.radius[1] and cam.fov_deg[0] <= c["fov"] <= cam.fov_deg[1]
        assert r["id_embedding"] == f"identities/{r['subject']}.safetensors"
        assert (out / r["id_embedding"]).is_file()
    # Folder index -> expression name by the default mapping; the same camera for both domains.
    assert {(r["subject"], r["expression"]) for r in records} == {
        ("000", EXPRESSION_NAMES[0]), ("000", EXPRESSION_NAMES[2]), ("017", EXPRESSION_NAMES[0]),
        ("017", EXPRESSION_NAMES[1])}
    by_key = {}
    for r in records:
        by_key.setdefault(r["image"].split("/", 1)[1], []).append(r["camera"])
    assert all(len(v) == 2 and v[0] == v[1] for v in by_key.values())


def test_prompts_follow_the_paper_template(built):
    records = _index(built[4])
    r = next(r for r in records if r["subject"] == "000" and r["domain"] == "normal")
    view = r["view"]
    assert r["prompt"] == f"A {view} view normal map face portrait of a young Caucasian female on a white background"
    r = next(r for r in records if r["subject"] == "017" and r["domain"] == "albedo")
    assert r["prompt"] == f"A {r['view']} view albedo face portrait of a elderly Asian male on a white background"
    az = abs(r["camera"]["azimuth"])
    assert r["view"] == ("front" if az < 45 else "back" if az > 135 else "side")


def _colour_fraction(path: Path, colour, tol=12) -> tuple[float, float]:
    a = np.asarray(Image.open(path)).astype(int)
    white = (a == 255).all(-1).mean()
    match = (np.abs(a - np.array(colour)).max(-1) <= tol).mean()
    return match, white


def test_albedo_images_show_the_scan_colour_and_normal_maps_show_normals(built):
    out = built[4]
    for stem, colour in (("000_000", RED), ("017_000", GREEN), ("017_001", BLUE)):
        match, white = _colour_fraction(out / "albedo" / f"{stem}_000.png", colour)
        assert match > 0.15 and white > 0.3 and match + white > 0.9
    normal = np.asarray(Image.open(out / "normal" / "000_000_000.png")).astype(float) / 255
    fg = ~(normal == 1).all(-1)
    n = normal[fg] * 2 - 1
    # Unit normals, mostly facing the camera (+z in camera space).
    assert np.abs(np.linalg.norm(n, axis=1) - 1).mean() < 0.1 and (n[:, 2] > 0).mean() > 0.9


def test_scans_are_normalised_into_the_head_frame(tmp_path):
    _vertex_coloured(tmp_path / "s.ply", RED)
    surface = load_scan(tmp_path / "s.ply")
    v = surface.vertices
    lo, hi = v.min(0).values, v.max(0).values
    assert torch.allclose((lo + hi) / 2, torch.zeros(3), atol=1e-5)
    assert abs(float((hi - lo).max()) - 1.6) < 1e-4 and float(v.abs().max()) <= 0.85
    assert (hi - lo).argmax() == 1  # the tall axis stays up
    # A scan stored Z-up and facing -Y ends up Y-up facing +Z.
    R = axis_rotation("+z", "-y")
    assert np.allclose(R @ [0, 0, 1], [0, 1, 0]) and np.allclose(R @ [0, -1, 0], [0, 0, 1])
    assert np.isclose(np.linalg.det(R), 1.0)
    with pytest.raises(DatasetBuildError, match="perpendicular"):
        axis_rotation("+y", "-y")


def test_rerun_skips_existing_images_and_rerenders_missing_ones_identically(built):
    tmp, scans, meta, ids, out, _ = built
    victim = out / "albedo" / "017_000_001.png"
    before = victim.read_bytes()
    index_before = (out / "index.jsonl").read_text()
    victim.unlink()
    report = build_render_dataset(scans, out, meta, views=3, resolution=32, seed=5, identities=ids, progress=False)
    assert report.rendered == 1 and report.skipped == 23
    assert victim.read_bytes() == before
    assert (out / "index.jsonl").read_text() == index_before
    assert not list(out.rglob(".*.tmp*"))  # atomic writes leave no temp files


def test_seed_decides_the_cameras(built, tmp_path):
    _, scans, meta, _, out, _ = built
    other = build_render_dataset(scans, tmp_path / "o", meta, views=3, resolution=32, seed=6, progress=False,
                                 normals_only=True)
    assert other.images == 12
    cams_a = [r["camera"] for r in _index(out) if r["domain"] == "normal"]
    cams_b = [r["camera"] for r in _index(tmp_path / "o")]
    assert cams_a != cams_b and all(r["id_embedding"] is None for r in _index(tmp_path / "o"))


def test_changed_settings_on_an_existing_folder_are_refused(built):
    _, scans, meta, _, out, _ = built
    with pytest.raises(DatasetBuildError, match="different settings.*resolution"):
        build_render_dataset(scans, out, meta, views=3, resolution=48, seed=5, progress=False)


def test_metadata_errors_are_clear(tmp_path, built):
    scans = built[1]
    bad = tmp_path / "bad.csv"
    bad.write_text("subject,sex,age\n0,F,20\n")
    with pytest.raises(DatasetBuildError, match="lacks column.*gender.*ethnicity"):
        read_subject_metadata(bad)
    bad.write_text("subject,gender,age,ethnicity\n0,F,abc1000,X\n0,F,20,X\n")
    with pytest.raises(DatasetBuildError, match="appears twice"):
        read_subject_metadata(bad)
    bad.write_text("subject,gender,age,ethnicity\n0,F,-5,X\n")
    with pytest.raises(DatasetBuildError, match="line 2.*plausible"):
        read_subject_metadata(bad)
    with pytest.raises(DatasetBuildError, match="no row for subject.*017"):
        build_render_dataset(scans, tmp_path / "o", write_metadata(tmp_path / "m.csv", rows=[("0", "f", "30", "X")]),
                             views=1, resolution=16, progress=False)
    with pytest.raises(DatasetBuildError, match="metadata file not found"):
        read_subject_metadata(tmp_path / "nope.csv")


def test_age_groups_and_prompt_words():
    assert [age_group(a) for a in ("8", "17", "25", "45.5", "70", "Young")] == [
        "child", "teenage", "young", "middle-aged", "elderly", "young"]
    info = SubjectInfo("female", "young", "Caucasian")
    assert make_prompt("front", "normal", info) == (
        "A front view normal map face portrait of a young Caucasian female on a white background")
    with pytest.raises(DatasetBuildError, match="unknown domain"):
        make_prompt("front", "depth", info)


def test_a_scan_without_colour_needs_normals_only(tmp_path):
    m = _head()
    (tmp_path / "s" / "003" / "000").mkdir(parents=True)
    m.export(tmp_path / "s" / "003" / "000" / "scan.ply")
    meta = write_metadata(tmp_path / "m.csv", rows=[("3", "m", "40", "African")])
    with pytest.raises(DatasetBuildError, match="no vertex colours or texture.*--normals-only"):
        build_render_dataset(tmp_path / "s", tmp_path / "o", meta, views=1, resolution=16, progress=False)
    report = build_render_dataset(tmp_path / "s", tmp_path / "o", meta, views=1, resolution=16, progress=False,
                                  normals_only=True)
    assert report.images == 1 and {r["domain"] for r in _index(tmp_path / "o")} == {"normal"}


def test_expression_names_file_overrides_the_mapping_and_bad_layouts_fail(tmp_path, built):
    names = tmp_path / "names.txt"
    names.write_text("# NPHM order\nsmile\nneutral\n\ngrin\n")
    assert read_expression_names(names) == ("smile", "neutral", "grin")
    report = build_render_dataset(built[1], tmp_path / "o", built[2], views=1, resolution=16, progress=False,
                                  expression_names=read_expression_names(names), normals_only=True)
    assert [r["expression"] for r in _index(tmp_path / "o")] == ["smile", "grin", "smile", "neutral"]
    assert report.images == 4
    names.write_text("smiel\n")
    with pytest.raises(DatasetBuildError, match="line 1.*did you mean 'smile'"):
        read_expression_names(names)
    names.write_text("neutral\n")
    with pytest.raises(DatasetBuildError, match="000.002 is index 2 but only 1 expression names"):
        build_render_dataset(built[1], tmp_path / "p", built[2], views=1, resolution=16, progress=False,
                             expression_names=read_expression_names(names))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetBuildError, match="no scans found.*017/000/scan.ply"):
        build_render_dataset(tmp_path / "empty", tmp_path / "q", built[2], progress=False)


def test_identity_files_are_checked(tmp_path, built):
    ids = tmp_path / "ids"
    ids.mkdir()
    save_file({"embedding": torch.ones(128)}, ids / "000.safetensors")
    with pytest.raises(DatasetBuildError, match="no identity file for subject.*017"):
        build_render_dataset(built[1], tmp_path / "o", built[2], views=1, resolution=16, identities=ids,
                             progress=False)
    save_file({"embedding": torch.ones(512)}, ids / "017.safetensors")
    with pytest.raises(DatasetBuildError, match="different embedding sizes"):
        build_render_dataset(built[1], tmp_path / "o", built[2], views=1, resolution=16, identities=ids,
                             progress=False)
    save_file({"other": torch.ones(128)}, ids / "017.safetensors")
    with pytest.raises(DatasetBuildError, match="no valid 'embedding'"):
        build_render_dataset(built[1], tmp_path / "o", built[2], views=1, resolution=16, identities=ids,
                             progress=False)


def test_cli_renders_a_dataset_and_reports_errors(tmp_path, built):
    runner = CliRunner()
    args = ["render-dataset", str(built[1]), "--out", str(tmp_path / "r"), "--metadata", str(built[2]),
            "--views", "1", "--resolution", "16", "--set", "render.camera.elevation_deg=[0, 10]"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    records = _index(tmp_path / "r")
    assert len(records) == 8 and all(0 <= r["camera"]["elevation"] <= 10 for r in records)
    res = runner.invoke(app, args[:4] + ["--metadata", str(tmp_path / "missing.csv")])
    assert res.exit_code == 2 and "metadata file not found" in res.output
    res = runner.invoke(app, args + ["--up", "up"])
    assert res.exit_code == 2 and "up axis must be one of" in res.output
