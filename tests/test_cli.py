"""The command line: help everywhere, a version, and bad input as one clear line (exit 2)."""

import pytest
import typer
from typer.testing import CliRunner

from idto3d import __version__
from idto3d.cli import app

runner = CliRunner()


def _all_command_paths(cmd, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    if hasattr(cmd, "commands"):  # a group (typer vendors its own click)
        for name, sub in cmd.commands.items():
            paths += _all_command_paths(sub, prefix + (name,))
    return paths


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.stdout


def test_every_command_has_help():
    paths = _all_command_paths(typer.main.get_command(app))
    assert ("bench", "render") in paths and ("fit-template",) in paths
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage" in result.output


def _assert_clean_error(result, pattern: str):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    import re

    assert re.search(pattern, result.output), result.output


def test_unknown_preset_is_one_clear_line():
    _assert_clean_error(runner.invoke(app, ["config", "--preset", "fast"]), r"unknown preset 'fast'")


def test_malformed_yaml_is_one_clear_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("render: {resolution: 64\n")
    _assert_clean_error(runner.invoke(app, ["config", "--config", str(f)]), "malformed YAML")


def test_config_prints_resolved_yaml():
    result = runner.invoke(app, ["config", "--preset", "paper", "--set", "seed=3"])
    assert result.exit_code == 0
    assert "seed: 3" in result.stdout and "grid_resolution: 256" in result.stdout


@pytest.mark.parametrize("args", [["template", "--resolution", "0"], ["render", "x.obj", "--resolution", "0"]])
def test_non_positive_resolution_is_refused(args, tmp_path):
    _assert_clean_error(runner.invoke(app, args), "must be > 0")


def test_missing_mesh_is_one_clear_line(tmp_path):
    result = runner.invoke(app, ["render", str(tmp_path / "nope.obj"), "-o", str(tmp_path / "n.png")])
    _assert_clean_error(result, "nope.obj")


def test_unreadable_mesh_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.ply"
    bad.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 99\n\x00\x01garbage")
    _assert_clean_error(runner.invoke(app, ["render", str(bad), "-o", str(tmp_path / "n.png")]), "bad.ply")


def test_non_manifold_template_is_refused(tmp_path):
    # Three triangles sharing one edge: not a manifold surface.
    obj = tmp_path / "fin.obj"
    obj.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 -1 0\nv 0 0 1\nf 1 2 3\nf 2 1 4\nf 1 2 5\n")
    _assert_clean_error(runner.invoke(app, ["template", "--mesh", str(obj), "-o", str(tmp_path / "t.obj")]),
                        "manifold")


def test_empty_template_is_refused(tmp_path):
    obj = tmp_path / "empty.obj"
    obj.write_text("# nothing here\n")
    _assert_clean_error(runner.invoke(app, ["template", "--mesh", str(obj), "-o", str(tmp_path / "t.obj")]),
                        "empty")


def test_bench_render_json_has_every_case_with_ratios():
    import json

    result = runner.invoke(app, ["bench", "render", "--quick", "--json", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {r["stage"] for r in rows} == {"render", "geometry"}
    assert any(r["backend"] == "torch" for r in rows)
    for r in rows:
        assert r["ms"] > 0 and r["ratio"] > 0
    assert min(r["ratio"] for r in rows if r["stage"] == "render") == 1.0


def test_fit_template_with_a_missing_user_template_is_one_clear_line(tmp_path):
    result = runner.invoke(app, ["fit-template", "-o", str(tmp_path / "run"), "--set",
                                 f"template.path={tmp_path / 'flame.obj'}"])
    _assert_clean_error(result, "flame.obj")
    assert not (tmp_path / "run").exists(), "a refused template must not create the run folder"


def test_fit_template_with_zero_grid_resolution_is_one_clear_line(tmp_path):
    result = runner.invoke(app, ["fit-template", "-o", str(tmp_path / "run"), "--set", "geometry.grid_resolution=0"])
    _assert_clean_error(result, "geometry.grid_resolution")
    assert not (tmp_path / "run").exists(), "a refused config must not create the run folder"


def test_fit_template_with_zero_iterations_is_refused_by_validation(tmp_path):
    result = runner.invoke(app, ["fit-template", "-o", str(tmp_path / "run"), "--set", "template.iterations=0"])
    _assert_clean_error(result, "template.iterations")
    assert not (tmp_path / "run").exists()


def test_fit_template_with_no_surface_is_an_error_and_never_marked_done(tmp_path):
    # One iteration: the barely trained field has no zero crossing yet, so no surface.
    result = runner.invoke(app, ["fit-template", "-o", str(tmp_path / "run"), "--set", "template.iterations=1",
                                 "--set", "geometry.grid_resolution=16", "--set", "template.build_resolution=32"])
    _assert_clean_error(result, "no surface")
    assert not (tmp_path / "run").exists(), "a fit with nothing to resume must leave no run folder"


