"""Configs: presets resolve, and every bad input names the key and what is allowed."""

import pytest

from idto3d.core.config import available_presets, config_from_dict, config_to_dict, dump_config, load_config
from idto3d.core.errors import ConfigError


def test_presets_preview_and_paper_exist_and_validate():
    assert {"preview", "paper"} <= set(available_presets())
    preview, paper = load_config("preview"), load_config("paper")
    assert preview.geometry.grid_resolution < paper.geometry.grid_resolution


def test_paper_preset_carries_the_papers_numbers():
    cfg = load_config("paper")
    g = cfg.geometry
    assert (g.iterations, g.grid_resolution, g.lr, g.laplacian_weight) == (6000, 256, 1e-4, 5000.0)
    assert (g.field.n_layers, g.field.latent_dim, g.encoding.kind) == (4, 32, "hash")


def test_unknown_preset_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"unknown preset 'papr'.*did you mean 'paper'.*allowed values"):
        load_config("papr")


def test_malformed_yaml_reports_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("geometry:\n  grid_resolution: [64\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"malformed YAML at line \d+"):
        load_config(file=f)


def test_top_level_yaml_must_be_a_mapping(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(file=f)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(file=tmp_path / "nope.yaml")


def test_unknown_key_is_named_with_a_suggestion_and_allowed_keys():
    with pytest.raises(ConfigError, match=r"'geometry.gird_resolution'.*'grid_resolution'.*allowed keys"):
        load_config(overrides=["geometry.gird_resolution=64"])


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"render.backend: invalid value 'vulkan'; allowed values: auto, torch"):
        load_config(overrides=["render.backend=vulkan"])


@pytest.mark.parametrize("value", ["0", "-3"])
def test_resolution_must_be_positive(value):
    with pytest.raises(ConfigError, match="geometry.grid_resolution.*out of range"):
        load_config(overrides=[f"geometry.grid_resolution={value}"])
    with pytest.raises(ConfigError, match="render.resolution.*out of range"):
        load_config(overrides=[f"render.resolution={value}"])


def test_wrong_types_are_named():
    with pytest.raises(ConfigError, match="geometry.grid_resolution: expected an integer"):
        load_config(overrides=["geometry.grid_resolution=big"])
    with pytest.raises(ConfigError, match=r"render.camera.radius: expected a list of 2"):
        load_config(overrides=["render.camera.radius=3"])
    with pytest.raises(ConfigError, match="lo > hi"):
        load_config(overrides=["render.camera.fov_deg=[50, 40]"])


def test_user_file_overrides_preset_and_overrides_win(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("preset: paper\ngeometry:\n  iterations: 10\nexpressions: [neutral, smile]\n")
    cfg = load_config(file=f, overrides=["geometry.iterations=20"])
    assert cfg.preset == "paper" and cfg.geometry.grid_resolution == 256
    assert cfg.geometry.iterations == 20 and cfg.expressions == ["neutral", "smile"]


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="divisible"):
        load_config(overrides=["geometry.field.d_model=30", "geometry.field.n_heads=4"])
    with pytest.raises(ConfigError, match="duplicates"):
        load_config(overrides=["expressions=[smile, smile]"])


def test_dumped_config_round_trips():
    cfg = load_config("paper", overrides=["seed=7"])
    import yaml

    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert config_to_dict(again) == config_to_dict(cfg)


def test_overrides_read_scalars_as_yaml_1_2() -> None:
    # PyYAML's YAML 1.1 would read 1e-4 as a string and `no` as false; users mean a float and a word.
    cfg = load_config("preview", overrides=["prior.train.lr=1e-4", "prior.train.mixed_precision=no",
                                            "prior.guidance.lambda_id=.5"])
    assert cfg.prior.train.lr == 1e-4 and isinstance(cfg.prior.train.lr, float)
    assert cfg.prior.train.mixed_precision == "no"
    assert cfg.prior.guidance.lambda_id == 0.5
    with pytest.raises(ConfigError, match="expected true or false"):
        load_config("preview", overrides=["identity.drop_outliers=yes"])
