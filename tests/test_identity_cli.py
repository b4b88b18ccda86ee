"""`idto3d identity` and `idto3d bench identity` through the CLI: bad inputs fail cleanly, output is atomic."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from identity_models import astronaut, insightface_photo, make_pack
from idto3d.cli import app
from idto3d.identity.io import load_identity

runner = CliRunner()
WIDE = {"COLUMNS": "400"}  # keep rich from wrapping the one-line messages


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "astronaut.png"
    Image.fromarray(astronaut()).save(path)
    return path


def _error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def _bad_inputs(tmp_path, photo):
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("this is text, not a JPEG")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    noface = tmp_path / "wall.png"
    Image.fromarray(np.full((200, 260, 3), 128, np.uint8)).save(noface)
    empty_dir = tmp_path / "nothing_here"
    empty_dir.mkdir()
    (empty_dir / "readme.txt").write_text("no photos")
    no_onnx = tmp_path / "buffalo_l"
    no_onnx.mkdir()
    wrong_dim = make_pack(tmp_path / "wrong_dim", dim=256)
    return {
        "not an image": ([str(not_image)], [], r"notes\.jpg is not an image"),
        "empty file": ([str(empty)], [], r"empty\.png is an empty file"),
        "no face": ([str(noface)], [], r"wall\.png: no face found"),
        "missing path": ([str(tmp_path / "gone.jpg")], [], r"photo not found: .*gone\.jpg"),
        "folder without images": ([str(empty_dir)], [], r"folder .*nothing_here has no images"),
        "unknown backend": ([str(photo)], ["--backend", "facenet"],
                            r"identity\.backend: invalid value 'facenet'; allowed values: dlib, arcface"),
        "pack without onnx": ([str(photo)], ["--pack", str(no_onnx)], r"buffalo_l has no SCRFD detector ONNX file"),
        "wrong output size": ([str(photo)], ["--pack", str(wrong_dim)],
                              r"w600k_r50\.onnx: expected one output of 512 values"),
        "arcface without pack": ([str(photo)], ["--backend", "arcface"], r"needs an insightface model pack"),
        "face index out of range": ([str(photo)], ["--face-index", "2"], r"--face-index 2 is out of range"),
        "not safetensors": ([str(photo)], ["-o", str(tmp_path / "id.pt")], r"--out must end in \.safetensors"),
    }


CASES = ["not an image", "empty file", "no face", "missing path", "folder without images", "unknown backend",
         "pack without onnx", "wrong output size", "arcface without pack", "face index out of range",
         "not safetensors"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_leaves_no_output(tmp_path, photo, case):
    photos, extra, pattern = _bad_inputs(tmp_path, photo)[case]
    out = tmp_path / "out" / "me.safetensors"
    args = ["identity", *photos, "-o", str(out), *extra] if "-o" not in extra else ["identity", *photos, *extra]
    line = _error_line(runner.invoke(app, args, env=WIDE))
    assert re.search(pattern, line), line
    assert not out.exists() and not (tmp_path / "out" / "me_crops").exists()
    assert not (tmp_path / "id.pt").exists()


def test_a_bad_photo_among_good_ones_writes_nothing(tmp_path, photo):
    out = tmp_path / "me.safetensors"
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _error_line(runner.invoke(app, ["identity", str(photo), str(bad), "-o", str(out)], env=WIDE))
    assert not out.exists()


def test_identity_command_writes_file_crops_and_table(tmp_path, photo):
    out = tmp_path / "runs" / "me.safetensors"
    group = insightface_photo("t1.jpg")
    result = runner.invoke(app, ["identity", str(photo), str(group), "-o", str(out), "--face-index", "0"],
                           env=WIDE)
    assert result.exit_code == 0, result.output
    ident = load_identity(out)
    assert ident.dim == 128 and ident.n_photos == 2
    crops = sorted(p.name for p in (tmp_path / "runs" / "me_crops").iterdir())
    assert "00_astronaut_dlib150.png" in crops and "00_astronaut_arcface112.png" in crops
    assert "astronaut.png" in result.output and "t1.jpg" in result.output
    assert "several faces" in result.output  # the table's quality column
    assert "may not show the same person" in result.output

    custom = tmp_path / "crops_here"
    result = runner.invoke(app, ["identity", str(photo), "-o", str(tmp_path / "b.safetensors"),
                                 "--crops", str(custom), "--set", "identity.min_face_size=100"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert (custom / "00_astronaut_dlib150.png").is_file()
    assert load_identity(tmp_path / "b.safetensors").photos[0]["quality"] == "small face"


def test_identity_command_arcface_path_with_a_pack(tmp_path, photo):
    pack = make_pack(tmp_path / "pack")
    out = tmp_path / "arc.safetensors"
    result = runner.invoke(app, ["identity", str(photo), "-o", str(out), "--pack", str(pack)], env=WIDE)
    assert result.exit_code == 0, result.output
    ident = load_identity(out)
    assert ident.backend == "arcface" and ident.dim == 512 and ident.embeddings.shape == (1, 512)


def test_bench_identity_json(tmp_path):
    pack = make_pack(tmp_path / "pack")
    result = runner.invoke(app, ["bench", "identity", "--json", "--repeats", "1", "--pack", str(pack)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    base = [r for r in rows if r["case"].startswith("decode+load")]
    assert len(base) == 1 and base[0]["ratio"] == 1.0
    for backend in ("dlib", "arcface"):
        steps = {r["case"].split(" (")[0]: r for r in rows if r["backend"] == backend}
        assert set(steps) == {"detect", "align", "embed", "total per photo"}
        for r in steps.values():
            assert r["ms"] > 0 and r["ratio"] == pytest.approx(r["ms"] / base[0]["ms"])
        assert steps["total per photo"]["ms"] == pytest.approx(
            sum(steps[s]["ms"] for s in ("detect", "align", "embed")))
