"""Configs: strict schema, overrides merged before validation, one-line errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from configs.errors import UserError
from configs.loader import flatten, load_config, to_yaml, validate_config
from configs.schema import PipelineConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_validates(path):
    config = load_config(path)
    assert isinstance(config, PipelineConfig)
    assert config.name == path.stem


def test_the_shipped_configs_include_quickstart_mnist_and_fashion_mnist():
    assert {"quickstart.yaml", "mnist.yaml", "fashion_mnist.yaml"} <= {p.name for p in CONFIGS}


def test_mnist_config_is_the_reference_experiment():
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "mnist.yaml")
    assert config.model.kind == "mlp" and config.model.encoder_widths == [256, 128]
    assert config.model.head_widths == [64] and config.model.activation == "relu"
    assert config.data.mean == [0.5] and config.data.std == [0.5]
    for phase in (config.pretrain, config.head, config.finetune):
        assert (phase.epochs, phase.batch_size, phase.optimizer.name, phase.optimizer.lr) == (5, 32, "adam", 1e-3)


def test_unknown_config_key_is_rejected_with_its_name(tmp_path):
    path = write(tmp_path, "finetune:\n  epoch: 3\n")
    with pytest.raises(UserError, match=r"unknown key 'finetune.epoch'; valid keys here: epochs, batch_size"):
        load_config(path)


def test_invalid_value_is_rejected_with_key_and_value(tmp_path):
    path = write(tmp_path, "pretrain:\n  optimizer:\n    lr: -1\n")
    with pytest.raises(UserError, match=r"invalid value for 'pretrain.optimizer.lr': .*greater than 0.*got -1"):
        load_config(path)


def test_errors_are_one_line(tmp_path):
    path = write(tmp_path, "head:\n  epochs: -1\n  batch_size: nope\n")
    with pytest.raises(UserError) as caught:
        load_config(path)
    assert "\n" not in str(caught.value)
    assert "and 1 more problem" in str(caught.value)


def test_overrides_are_merged_before_validation_with_yaml_types(tmp_path):
    path = write(tmp_path, "finetune:\n  epochs: 7\n")
    config = load_config(path, ["finetune.epochs=3", "data.label_fraction=0.1", "model.encoder_widths=[64, 8]"])
    assert config.finetune.epochs == 3
    assert config.data.label_fraction == 0.1
    assert config.model.encoder_widths == [64, 8]


def test_override_of_unknown_key_is_rejected_with_its_name(tmp_path):
    with pytest.raises(UserError, match="unknown key 'finetune.epoch'"):
        load_config(write(tmp_path, "{}"), ["finetune.epoch=3"])


def test_malformed_override_says_the_expected_form(tmp_path):
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_config(write(tmp_path, "{}"), ["finetune.epochs"])


def test_unreadable_yaml_names_the_file_and_line(tmp_path):
    path = write(tmp_path, "data:\n  dataset: [digits\n")
    with pytest.raises(UserError, match=r"config.yaml: line \d+ is not valid YAML"):
        load_config(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UserError, match="nope.yaml: cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_image_folder_requires_its_directory():
    with pytest.raises(UserError, match="data.image_folder must be set"):
        validate_config({"data": {"dataset": "image_folder"}})


def test_a_loaded_config_is_immutable():
    config = validate_config({})
    with pytest.raises(Exception, match="frozen"):
        config.seed = 3


def test_flatten_gives_dotted_keys_for_every_leaf():
    flat = flatten(validate_config({"finetune": {"optimizer": {"lr": 0.5}}}))
    assert flat["finetune.optimizer.lr"] == "0.5"
    assert flat["model.encoder_widths"] == "[256, 128]"
    assert not any(isinstance(value, dict) for value in flat.values())


def test_resolved_yaml_round_trips():
    config = validate_config({"seed": 7, "head": {"epochs": 2}})
    assert validate_config(yaml.safe_load(to_yaml(config))) == config


def test_contrastive_pretraining_without_augmentation_is_rejected_naming_the_fix():
    with pytest.raises(UserError, match="pretrain.objective contrastive .* set pretrain.augment"):
        validate_config({"pretrain": {"objective": "contrastive"}})
