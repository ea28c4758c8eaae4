"""Flags and YAML come from the config dataclasses: precedence, aliases, validation, help."""

import dataclasses

import pytest

from dpocache.cli import _classes, _configs, build_parser, main
from dpocache.config import ConfigError


def parse(argv):
    args = build_parser().parse_args(argv)
    return _configs(args)


def test_cli_beats_yaml_beats_defaults(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 1.0e-6\nbeta: 0.1\nloss-type: dpo\nmax_grad_norm: null\n")
    model_cfg, _, train_cfg, loss_cfg = parse(["train", "--config", str(cfg), "--beta", "0.3",
                                               "--model_name_or_path", "m"])
    assert train_cfg.learning_rate == 1e-6          # from YAML (dashed key accepted)
    assert loss_cfg.beta == 0.3                     # command line wins
    assert loss_cfg.loss_type == "dpo"
    assert train_cfg.per_device_train_batch_size == 8  # default
    assert model_cfg.model_name_or_path == "m"


def test_dashed_aliases_and_booleans():
    _, _, train_cfg, _ = parse(["train", "--learning-rate", "0.5", "--verify-store", "false", "--allow_missing"])
    assert train_cfg.learning_rate == 0.5
    assert train_cfg.verify_store is False and train_cfg.allow_missing is True


def test_shared_field_sets_every_config():
    _, data_cfg, _, _, train_cfg, _, _ = parse(["run", "--seed", "7"])
    assert data_cfg.seed == 7 and train_cfg.seed == 7


def test_unknown_yaml_key_and_bad_values_name_the_field(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rat: 1.0\n")
    with pytest.raises(ConfigError, match="unknown option.*learning_rat"):
        parse(["train", "--config", str(cfg)])
    with pytest.raises(ConfigError, match="per_device_train_batch_size"):
        parse(["train", "--per_device_train_batch_size", "0"])
    with pytest.raises(ConfigError, match="loss_type"):
        parse(["train", "--loss_type", "nope"])
    with pytest.raises(ConfigError, match="verify_store"):
        parse(["train", "--verify_store", "maybe"])


@pytest.mark.parametrize("command", ["score", "train", "run", "data"])
def test_help_documents_every_field(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    for cls in _classes(command):
        for f in dataclasses.fields(cls):
            assert f"--{f.name}" in text, f.name
