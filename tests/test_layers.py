"""The layers of README "Layout" are a contract: `lint-imports` (import-linter, configured in pyproject.toml)
passes on the package, fails on an upward import (or an import cycle) planted in a copy of it, and every folder is
covered."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import idto3d

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(idto3d.__file__).parent

# One upward import per contract: (the file it is planted in, the import, the contract it breaks)
PLANTED = [
    ("core/errors.py", "import idto3d.render.mesh", "core "),
    ("render/mesh.py", "import idto3d.geometry.template", "render "),
    ("nn/blocks.py", "import idto3d.geometry.expression_field", "nn "),
    ("geometry/laplacian.py", "import idto3d.texture.texels", "geometry "),
    ("identity/faces.py", "import idto3d.render.camera", "identity "),
    ("face_model/landmarks.py", "import idto3d.priors.guidance", "face_model "),
    ("priors/guidance.py", "import idto3d.geometry.laplacian", "priors "),
    ("priors/training/scans.py", "import idto3d.texture.texels", "priors.training "),
    ("texture/texels.py", "import idto3d.export.maps", "texture "),
    ("export/maps.py", "import idto3d.stages.step_log", "export "),
    ("stages/step_log.py", "import idto3d.evaluate.plots", "stages "),
    ("evaluate/plots.py", "import idto3d.stages.step_log", "evaluate "),
    ("batch/live.py", "import idto3d.cli.app", "batch "),
    ("render/camera.py", "import idto3d.bench.timing", "only the CLI imports the benchmarks"),
    ("bench/timing.py", "import idto3d.cli.app", "the benchmarks never import the CLI"),
    # the backends import the interface, so this closes a cycle (the one between embedder and backends before)
    ("identity/face_backend.py", "import idto3d.identity.dlib_backend", "no import cycles"),
]


def _lint(pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "importlinter.cli"]
    return subprocess.run([*cmd, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]["contracts"]


def test_the_package_keeps_every_layer_contract():
    out = _lint()
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"Contracts: {len(_contracts())} kept, 0 broken" in out.stdout


def test_every_folder_is_covered_by_a_contract():
    sources = {m for c in _contracts() for m in c.get("source_modules", [])} | {"idto3d.cli"}  # the top may import anything
    folders = {"idto3d." + str(p.parent.relative_to(PACKAGE)).replace(os.sep, ".")
               for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE}
    uncovered = sorted(f for f in folders if not any(f == s or f.startswith(s + ".") for s in sources))
    assert not uncovered, f"add these folders to a layer contract in pyproject.toml: {uncovered}"


def test_a_planted_upward_import_breaks_its_contract(tmp_path):
    copy = tmp_path / "idto3d"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, line, _ in PLANTED:
        path = copy / rel
        path.write_text(path.read_text(encoding="utf-8") + f"\n{line}  # planted upward import\n", encoding="utf-8")
    out = _lint(pythonpath=tmp_path)
    assert out.returncode != 0
    # Each planted import breaks exactly one contract, so all of them must be reported broken (had the copy
    # not been the package analysed, all would be kept).
    assert f"Contracts: 0 kept, {len(_contracts())} broken" in out.stdout, out.stdout
