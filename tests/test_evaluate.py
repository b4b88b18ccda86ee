"""``idto3d evaluate``: camera grid, GLB round trip, identity similarity vs reference photos, plots, metrics.json.

The runs are built here instead of by ``generate``: the built-in head, UV-unwrapped, with a photo projected onto
its front through the texels' 3-D points (eyes and mouth of the photo placed on the head's eye and mouth
anchors), exported with ``export_expression`` beside a ``config.yaml``: a head dlib sees as that photo's person.
"""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import map_coordinates
from skimage.transform import estimate_transform
from typer.testing import CliRunner

from idto3d.cli import app
from idto3d.core.config import dump_config, load_config
from idto3d.core.errors import IdtoError
from idto3d.evaluate import plots
from idto3d.evaluate.assets import load_exported_head, run_heads
from idto3d.evaluate.run import FORMAT, METRICS_KEYS, evaluate_runs
from idto3d.evaluate.similarity import make_embedder
from idto3d.evaluate.views import camera_grid, render_grid, render_normal_grid
from idto3d.export import PBRMaps, export_expression, shared_atlas
from idto3d.export.placement import metric_positions
from idto3d.core.units import METRES_PER_UNIT
from idto3d.geometry.template import build_head_template, face_anchors
from idto3d.identity.dlib_backend import DlibBackend
from idto3d.identity.photos import load_photo
from idto3d.render.mesh import Mesh
from idto3d.texture.texels import scatter_texels, texel_map

from identity_models import astronaut, insightface_photo

TEXTURE = 256
HANKS = "Tom_Hanks_54745.png"


def photo_texture(uv_mesh, photo: np.ndarray, size: int = TEXTURE) -> PBRMaps:
    """Project ``photo``'s face onto the head's front (x, y of each texel's 3-D point, similarity from the head's
    eye/mouth anchors to the photo's), fading into the face's mean colour toward the back."""
    face = DlibBackend().detect(photo)[0]
    lm = face.landmarks5
    src = np.stack([lm[0], lm[1], lm[3:5].mean(0)])  # image-left eye (the subject's right), other eye, mouth
    a = face_anchors()
    dst = np.stack([a["right_eye"][:2].numpy(), a["left_eye"][:2].numpy(), a["mouth"][:2].numpy()]) * [1, -1]
    head_to_photo = estimate_transform("similarity", dst, src)  # photo y runs down, head y up: hence the flip
    texels = texel_map(uv_mesh, size)
    p = texels.points.numpy()
    xy = head_to_photo(p[:, :2] * [1, -1])
    colour = np.stack([map_coordinates(photo[..., c].astype(np.float32), [xy[:, 1], xy[:, 0]], order=1,
                                       mode="nearest") for c in range(3)], 1) / 255.0
    b = face.box.astype(int)
    skin = photo[b[1]:b[3], b[0]:b[2]].reshape(-1, 3).mean(0) / 255.0
    w = np.clip(p[:, 2:3] / 0.2, 0.0, 1.0)  # the front (z > 0.2 units) shows the photo
    albedo = scatter_texels(torch.tensor(w * colour + (1 - w) * skin, dtype=torch.float32), texels).numpy()
    return PBRMaps.create(albedo, np.full((size, size), 0.6, np.float32), np.zeros((size, size), np.float32))


def smile(mesh: Mesh) -> Mesh:
    """A second 'expression': the mouth corners pulled outward and up (same topology)."""
    v = mesh.vertices.clone()
    mouth = face_anchors()["mouth"]
    w = torch.exp(-((v - mouth) ** 2).sum(1) / 0.15**2)[:, None]
    v = v + w * torch.stack([0.12 * torch.sign(v[:, 0]) * v[:, 0].abs().clamp(max=0.2), torch.full_like(v[:, 0], 0.02),
                             torch.zeros_like(v[:, 0])], 1)
    return Mesh(v, mesh.faces.clone())


def make_run(root: Path, photo: np.ndarray, expressions=("neutral", "smile")) -> Path:
    head = build_head_template(32)
    meshes = [head if n == "neutral" else smile(head) for n in expressions]
    atlases = shared_atlas(meshes)
    maps = photo_texture(atlases[0], photo)
    for name, atlas in zip(expressions, atlases):
        export_expression(root / "export", name, atlas, maps)
    cfg = load_config("preview", None, [f"expressions=[{', '.join(expressions)}]"])
    (root / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    (root / "geometry").mkdir()
    (root / "geometry" / "init_report.json").write_text(json.dumps({"seconds": 12.5}), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def astronaut_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("refs") / "astronaut.png"
    Image.fromarray(astronaut()).save(path)
    return path


@pytest.fixture(scope="module")
def astronaut_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("astronaut_run"), astronaut())


@pytest.fixture(scope="module")
def hanks_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("hanks_run"), load_photo(insightface_photo(HANKS)), ("neutral",))


@pytest.fixture(autouse=True)
def no_html_report(monkeypatch):
    """The HTML report is another module's job: record its calls instead of writing it."""
    calls = []
    fake = types.ModuleType("idto3d.evaluate.report")
    fake.write_report = lambda run_dir, metrics: calls.append((Path(run_dir), metrics)) or Path(run_dir) / "x.html"
    fake.calls = calls
    monkeypatch.setitem(sys.modules, "idto3d.evaluate.report", fake)
    return calls


# --- camera grid and renders ------------------------------------------------------------------------------------


def test_camera_grid_is_the_papers_range():
    g = camera_grid()
    assert g.elevations == (-15.0, 0.0, 15.0)
    np.testing.assert_allclose(g.azimuths, np.linspace(-65, 65, 7))
    assert len(g) == 21 and len(g.views) == 21 and (0.0, 0.0) in g.views
    assert g.views[0] == (-15.0, -65.0) and g.views[1] == (-15.0, g.azimuths[1])  # elevation-major
    g2 = camera_grid(2, 4)
    assert g2.elevations == (-15.0, 15.0) and g2.azimuths[0] == -65.0 and g2.azimuths[-1] == 65.0 and len(g2) == 8
    assert camera_grid(1, 1).views == [(0.0, 0.0)]
    for bad in ((0, 7), (3, -1), (True, 3), (3, 2.5)):
        with pytest.raises(IdtoError, match="whole number"):
            camera_grid(*bad)


def test_render_grid_nonblank_and_front_view_symmetric(astronaut_run):
    head = load_exported_head(astronaut_run / "export" / "neutral.glb")
    grid = camera_grid(3, 3)
    images = render_grid(head, grid, 128)
    assert images.shape == (9, 128, 128, 3) and images.dtype == np.uint8
    covered = (images < 250).any(-1).mean((1, 2))
    assert (covered > 0.1).all(), covered  # every view shows the head
    # Mirror views see mirrored silhouettes (the head is symmetric; the texture is not).
    front, left, right = (images[grid.views.index(v)] for v in ((0.0, 0.0), (0.0, -65.0), (0.0, 65.0)))
    mask = (front < 250).any(-1)
    assert (mask == mask[:, ::-1]).mean() > 0.97
    assert ((left < 250).any(-1) == (right < 250).any(-1)[:, ::-1]).mean() > 0.97
    normals = render_normal_grid(head, grid, 64)
    assert normals.shape == (9, 64, 64, 3)
    centre = normals[4, 24:40, 24:40].reshape(-1, 3).mean(0)  # the face, seen from the front: blue-violet
    assert centre[2] > 200 and abs(centre[0] - 128) < 40, centre


# --- GLB round trip ---------------------------------------------------------------------------------------------


def test_load_exported_head_round_trip(tmp_path):
    head = build_head_template(24)
    (uvm,) = shared_atlas([head])
    rng = np.random.default_rng(0)
    maps = PBRMaps.create(rng.random((32, 48, 3)), rng.random((32, 48)), rng.random((32, 48)))
    export_expression(tmp_path, "neutral", uvm, maps)
    loaded = load_exported_head(tmp_path / "neutral.glb")
    assert loaded.name == "neutral"
    # Positions: working space up to the export's centring; welded back to the source vertices.
    expected = metric_positions(uvm, METRES_PER_UNIT) / METRES_PER_UNIT
    assert loaded.mesh.vertices.shape[0] == head.vertices.shape[0] and loaded.mesh.faces.shape == head.faces.shape
    corners = loaded.mesh.vertices[loaded.mesh.faces].numpy()
    np.testing.assert_allclose(corners, expected[uvm.faces], atol=1e-5)
    np.testing.assert_allclose(loaded.uv[loaded.attribute_faces].numpy(), uvm.uvs[uvm.faces], atol=1e-6)
    # Maps come back within PNG quantisation (1/255; rounding gives half of it).
    np.testing.assert_allclose(loaded.maps.albedo, maps.albedo, atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(loaded.maps.roughness, maps.roughness, atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(loaded.maps.metallic, maps.metallic, atol=0.5 / 255 + 1e-6)
    # The welded surface is closed: every edge is shared by exactly two triangles.
    f = loaded.mesh.faces.numpy()
    edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert (counts == 2).all()


def test_load_exported_head_rejects_non_glb(tmp_path):
    bad = tmp_path / "neutral.glb"
    bad.write_bytes(b"not a gltf file")
    with pytest.raises(IdtoError, match="neutral.glb"):
        load_exported_head(bad)


# --- identity similarity ----------------------------------------------------------------------------------------


def test_front_render_is_recognised_as_the_photo(astronaut_run):
    """The fixture's premise: dlib finds the face in the front render, and it is the astronaut."""
    embed = make_embedder(load_config("preview").identity)
    head = load_exported_head(astronaut_run / "export" / "neutral.glb")
    front = render_grid(head, camera_grid(1, 1), 256)[0]
    e_render, e_photo = embed(front), embed(astronaut())
    assert e_render is not None
    assert np.linalg.norm(e_render - e_photo) < 0.6


@pytest.mark.slow
def test_astronaut_run_is_closer_to_astronaut_than_to_another_person(astronaut_run, astronaut_png,
                                                                    no_html_report, capsys):
    """The issue's acceptance test: same run, two reference sets."""
    cfg = load_config("preview")
    grid = camera_grid(3, 5)
    t = time.perf_counter()
    own = evaluate_runs([astronaut_run], [astronaut_png], cfg, grid=grid, progress=False)["runs"][0]
    seconds = time.perf_counter() - t
    other = evaluate_runs([astronaut_run], [insightface_photo(HANKS)], cfg, grid=grid, progress=False)["runs"][0]
    a, b = own["identity"], other["identity"]
    with capsys.disabled():
        print(f"\n[evaluate] astronaut run, {len(grid)} views x 2 expressions in {seconds:.1f} s: "
              f"vs astronaut cosine {a['cosine']['mean']:.4f} +- {a['cosine']['std']:.4f}, distance "
              f"{a['distance']['mean']:.4f}; vs Tom Hanks cosine {b['cosine']['mean']:.4f} +- {b['cosine']['std']:.4f},"
              f" distance {b['distance']['mean']:.4f}; faces missed {a['faces_missed']}/{a['renders']}")
    assert a["faces_missed"] == b["faces_missed"] < a["renders"]  # same renders, same detections
    assert a["cosine"]["mean"] > b["cosine"]["mean"]
    assert a["distance"]["mean"] < b["distance"]["mean"]
    assert a["distance"]["mean"] < a["threshold"] < b["distance"]["mean"]  # dlib's calibrated same-person rule
    assert a["same_person_rate"] > 0.5 and b["same_person_rate"] < 0.5
    # The report hook got each evaluation's metrics.
    assert [m["identity"]["cosine"]["mean"] for _, m in no_html_report] == [a["cosine"]["mean"], b["cosine"]["mean"]]


# --- metrics.json and plots -------------------------------------------------------------------------------------


def _check_png(path: Path) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) > 50


def test_two_runs_write_metrics_plots_and_comparison(astronaut_run, hanks_run, astronaut_png, no_html_report):
    grid = camera_grid(3, 3)
    result = evaluate_runs([astronaut_run, hanks_run], [astronaut_png], load_config("preview"), grid=grid,
                           resolution=192, progress=False)
    assert len(result["runs"]) == 2 and len(result["comparison"]) == 2
    assert [r for r, _ in no_html_report] == [astronaut_run, hanks_run]
    assert result["reports"] == [astronaut_run / "x.html", hanks_run / "x.html"]
    for run, metrics in zip((astronaut_run, hanks_run), result["runs"]):
        on_disk = json.loads((run / "report" / "metrics.json").read_text(encoding="utf-8"))
        assert on_disk == metrics
        assert tuple(metrics) == METRICS_KEYS and metrics["format"] == FORMAT
        assert metrics["backend"] == "dlib" and metrics["references"] == [str(astronaut_png.resolve())]
        assert metrics["grid"]["elevations"] == [-15.0, 0.0, 15.0] and metrics["grid"]["azimuths"] == [-65.0, 0.0, 65.0]
        ident = metrics["identity"]
        for key in ("cosine", "distance"):
            assert set(ident[key]) == {"mean", "std", "min", "max", "n"}
        assert ident["threshold"] == pytest.approx(0.4) and ident["renders"] == 9 * len(metrics["expressions"])
        assert ident["cosine"]["n"] + ident["faces_missed"] == ident["renders"]
        assert len(ident["per_view"]) == ident["renders"]
        assert set(ident["per_view"][0]) == {"expression", "elevation", "azimuth", "cosine", "distance"}
        for name, e in metrics["expressions"].items():
            assert set(e) == {"cosine_to_neutral_front", "distance_to_neutral_front"}
            assert set(e["cosine_to_neutral_front"]) == {"mean", "std", "min", "max", "n"}
        assert metrics["reference_view"] == {"expression": "neutral", "elevation": 0.0, "azimuth": 0.0,
                                             "face_found": True}
        assert metrics["fid"]["texture"] is None and metrics["fid"]["geometry"] is None
        assert metrics["timings"]["stages"] == {"template_fit": 12.5}
        assert set(metrics["timings"]["evaluate"]) == {"render", "identity", "fid", "plots", "total"}
        files = metrics["files"]
        for key in ("similarity", "per_view", "tsne", "comparison"):
            _check_png(run / files[key])
        assert set(files["renders"]) == set(metrics["expressions"]) == set(files["heads"])
        for rel in files["renders"].values():
            with Image.open(run / rel) as im:  # contact sheet: rows = elevations, columns = azimuths
                assert im.size == (3 * 192, 3 * 192)
    assert list(result["runs"][0]["expressions"]) == ["neutral", "smile"]
    # Neutral excludes its own front render (cosine 1): 8 of 9 views at most.
    assert result["runs"][0]["expressions"]["neutral"]["cosine_to_neutral_front"]["n"] <= 8
    # Each run is compared with the astronaut photo: the astronaut head is closer than Tom Hanks' head.
    a, h = (m["identity"]["distance"]["mean"] for m in result["runs"])
    assert a < h
    # Evaluated alone later, a run keeps no comparison with runs it was not compared with.
    alone = evaluate_runs([hanks_run], [astronaut_png], load_config("preview"), grid=camera_grid(1, 1),
                          resolution=64, progress=False)
    assert alone["comparison"] == [] and alone["runs"][0]["files"]["comparison"] is None
    assert not (hanks_run / "report" / "comparison.png").exists()


def test_tsne_separates_two_identities(tmp_path):
    """t-SNE keeps two tight, distant clusters apart (figure 6 middle's claim, on synthetic embeddings)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, 128))
    emb = np.concatenate([c + 0.05 * rng.normal(size=(15, 128)) for c in centres])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    xy = plots.tsne_points(emb)
    a, b = xy[:15], xy[15:]
    gap = np.linalg.norm(a.mean(0) - b.mean(0))
    assert gap > 3 * max(a.std(0).max(), b.std(0).max())
    np.testing.assert_allclose(plots.tsne_points(emb), xy)  # fixed seed
    out = plots.tsne_figure(tmp_path / "t.png", emb, ["a"] * 15 + ["b"] * 15, ["neutral", "smile"] * 15)
    _check_png(out)
    _check_png(plots.tsne_figure(tmp_path / "few.png", emb[:2], ["a", "b"], ["neutral", "neutral"]))


def test_fid_uses_renders_and_normal_maps(astronaut_run, astronaut_png, tmp_path, monkeypatch):
    """FID is wired to the grid's renders (texture) and normal maps (geometry); the FID itself is fid.py's job."""
    calls = []
    fake = types.ModuleType("idto3d.evaluate.fid")
    fake.fid_from_folders = lambda images, folder, weights: calls.append((np.stack(images), folder, weights)) or 7.0
    monkeypatch.setitem(sys.modules, "idto3d.evaluate.fid", fake)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "nrm").mkdir()
    (tmp_path / "inception.onnx").write_bytes(b"x")
    m = evaluate_runs([astronaut_run], [astronaut_png], load_config("preview"), grid=camera_grid(1, 2),
                      resolution=64, fid_images=tmp_path / "imgs", fid_normals=tmp_path / "nrm",
                      inception=tmp_path / "inception.onnx", progress=False)["runs"][0]
    assert m["fid"]["texture"] == 7.0 and m["fid"]["geometry"] == 7.0
    (tex, f1, w1), (nrm, f2, w2) = calls
    assert f1 == tmp_path / "imgs" and f2 == tmp_path / "nrm" and w1 == w2 == tmp_path / "inception.onnx"
    assert tex.shape == nrm.shape == (4, 64, 64, 3)  # 2 views x 2 expressions
    centre = nrm[:, 24:40, 24:40].reshape(-1, 3).mean(0)
    assert centre[2] > 200 and abs(centre[0] - 128) < 60  # normal maps: facing the camera is blue-violet
    assert not np.array_equal(tex, nrm)


# --- bad inputs -------------------------------------------------------------------------------------------------


def test_bad_run_folders(tmp_path, astronaut_png):
    cfg = load_config("preview")
    with pytest.raises(IdtoError, match="not found"):
        evaluate_runs([tmp_path / "nope"], [astronaut_png], cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(IdtoError, match="is empty.*idto3d generate"):
        evaluate_runs([tmp_path / "empty"], [astronaut_png], cfg)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hi")
    with pytest.raises(IdtoError, match="not a run folder .no config.yaml"):
        run_heads(tmp_path / "other")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(load_config("preview")), encoding="utf-8")
    with pytest.raises(IdtoError, match="no exported heads.*run `idto3d generate` first"):
        evaluate_runs([run], [astronaut_png], cfg)


def test_reference_without_face_names_the_photo(astronaut_run, tmp_path):
    blank = tmp_path / "wall.png"
    Image.fromarray(np.full((200, 200, 3), 180, np.uint8)).save(blank)
    with pytest.raises(IdtoError, match=r"reference photo .*wall\.png: no face found"):
        evaluate_runs([astronaut_run], [blank], load_config("preview"), progress=False)


def test_fid_options_need_the_inception_file(astronaut_run, astronaut_png, tmp_path):
    with pytest.raises(IdtoError, match="--inception"):
        evaluate_runs([astronaut_run], [astronaut_png], load_config("preview"), fid_images=tmp_path)
    with pytest.raises(IdtoError, match="not found"):
        evaluate_runs([astronaut_run], [astronaut_png], load_config("preview"), fid_images=tmp_path,
                      inception=tmp_path / "missing.onnx")


def test_cli_bad_inputs_exit_2_with_one_error_line(tmp_path, astronaut_run, astronaut_png):
    runner = CliRunner()
    (tmp_path / "empty").mkdir()
    blank = tmp_path / "wall.png"
    Image.fromarray(np.full((200, 200, 3), 180, np.uint8)).save(blank)
    for args in (["evaluate", str(tmp_path / "empty"), "--references", str(blank)],
                 ["evaluate", str(astronaut_run), "--references", str(blank)],
                 ["evaluate", str(astronaut_run), "--references", str(tmp_path / "missing.jpg")],
                 # `--references a.png b.png` (an unquoted glob): the second photo arrives as a run folder
                 ["evaluate", str(astronaut_run), str(astronaut_png), "--references", str(astronaut_png)]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, res.output
        assert "Traceback" not in res.output and res.output.startswith("error:"), res.output
        assert sum(ln.startswith("error:") for ln in res.output.splitlines()) == 1  # rich may wrap the message
    assert "is a photo, not a run folder" in " ".join(res.output.split())


def test_cli_evaluate_prints_table(astronaut_run, astronaut_png):
    quoted_glob = str(astronaut_png.parent / "astro*.png")  # expanded by the command, not the shell
    res = CliRunner().invoke(app, ["evaluate", str(astronaut_run), "--references", quoted_glob,
                                   "--elevations", "1", "--azimuths", "3", "--resolution", "128"])
    assert res.exit_code == 0, res.output
    assert "mean cosine" in res.output and astronaut_run.name in res.output and "report ->" in res.output
    assert "1 reference photo" in res.output
