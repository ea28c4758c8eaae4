"""The loss options: per-loss beta defaults, the learning-rate default, combinations, validation with
one-line errors, requirements against a store, the embedded demo's own values, and the CLI surface."""

import math

import pytest

from dpocache.cli import build_parser, main
from dpocache.config import ConfigError, build, load_yaml
from dpocache.losses import LOSSES, LossConfig, check_requirements
from dpocache.pipeline import apply_demo_training_values
from dpocache.stages.train import TrainConfig


def parse(argv):
    from dpocache.cli import _configs

    return _configs(build_parser().parse_args(argv))


@pytest.mark.parametrize("name,beta", [("dpo", 0.1), ("sigmoid", 0.1), ("dpo_norm", 5.0), ("sigmoid_norm", 0.1),
                                       ("simpo", 2.0), ("wpo", 0.1), ("ipo", 0.1), ("bco_pair", 0.1),
                                       ("discopop", 0.1), ("orpo", 0.1), ("kto_pair", 0.1)])
def test_beta_defaults_per_loss(name, beta):
    cfg = LossConfig(loss_type=name, label_smoothing=1e-3 if name == "exo_pair" else 0.0)
    assert cfg.beta == beta and cfg.beta_is_default
    assert "--beta sets it" in cfg.describe()
    given = LossConfig(loss_type=name, beta=0.7)
    assert given.beta == 0.7 and not given.beta_is_default


def test_every_trl_loss_defaults_to_trls_beta():
    for name in ["sigmoid", "hinge", "ipo", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
                 "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]:
        assert LossConfig(loss_type=name).beta == 0.1, name
    assert LossConfig(loss_type="exo_pair", label_smoothing=1e-3).beta == 0.1


def test_switching_loss_on_the_command_line_switches_the_default_beta(capsys):
    assert main(["train", "--loss_type", "dpo", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "loss_type: dpo\n" in out and "beta: 0.1\n" in out and "learning_rate: 1.0e-06\n" in out
    assert main(["train", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "loss_type: dpo_norm\n" in out and "beta: 5.0\n" in out


def test_learning_rate_default_is_a_real_runs():
    cfg = TrainConfig()
    assert cfg.learning_rate == 1e-6 and cfg._learning_rate_default
    assert not TrainConfig(learning_rate=1e-6)._learning_rate_default


def test_mpo_combination_from_flags_and_yaml(tmp_path):
    *_, loss = parse(["train", "--loss_type", "sigmoid,bco_pair,sft", "--loss_weights", "0.8,0.2,1.0"])
    assert loss.components == [("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)]
    assert loss.beta == 0.1 and not loss.reference_free and not loss.averaged
    yaml_file = tmp_path / "mpo.yaml"
    yaml_file.write_text("loss_type: [sigmoid, bco_pair, sft]\nloss_weights: [0.8, 0.2, 1.0]\n")
    (loss_from_yaml,) = build([LossConfig], load_yaml(yaml_file))
    assert loss_from_yaml.components == loss.components
    assert loss_from_yaml.loss_type == "sigmoid,bco_pair,sft" and loss_from_yaml.loss_weights == "0.8,0.2,1.0"
    assert LossConfig(loss_type="dpo", sft_weight=0.5).components == [("dpo", 1.0), ("sft", 0.5)]


@pytest.mark.parametrize("argv,message", [
    (["--loss_type", "sigmod"], "loss_type: unknown loss 'sigmod'; did you mean 'sigmoid'?"),
    (["--loss_type", "dpo,ipo", "--loss_weights", "1"], "loss_weights: 1 weight(s) for 2 loss(es)"),
    (["--loss_type", "dpo,ipo", "--loss_weights", "1,inf"], "every weight must be a finite number"),
    (["--loss_type", "dpo,ipo", "--loss_weights", "1,x"], "expected comma-separated numbers"),
    (["--loss_type", "dpo,ipo", "--loss_weights", "0,0"], "at least one weight must be > 0"),
    (["--loss_type", "sigmoid,dpo"], "dpo given twice"),
    (["--beta", "nan"], "beta: expected a finite number"),
    (["--beta", "0"], "beta must be > 0"),
    (["--label_smoothing", "nan"], "label_smoothing: expected a finite number"),
    (["--label_smoothing", "0.5"], "label_smoothing must be in [0, 0.5)"),
    (["--ld_alpha", "1.5"], "ld_alpha must be in [0, 1]"),
    (["--ld_alpha", "inf"], "ld_alpha: expected a finite number"),
    (["--f_alpha_divergence_coef", "nan"], "f_alpha_divergence_coef: expected a finite number"),
    (["--loss_type", "exo_pair"], "exo_pair needs --label_smoothing > 0"),
    (["--loss_type", "bco_pair", "--f_divergence_type", "js_divergence"], "not defined for bco_pair"),
    (["--f_divergence_type", "kl"], "f_divergence_type: expected one of"),
    (["--loss_type", "aot", "--use_weighting"], "use_weighting: not defined for aot"),
    (["--loss_type", "dpo,sft", "--sft_weight", "0.5"], "sft is already in --loss_type"),
    (["--discopop_tau", "0"], "discopop_tau must be > 0"),
    (["--learning_rate", "nan"], "learning_rate: expected a finite number"),
])
def test_bad_loss_options_are_one_line_errors(argv, message, capsys):
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_every_loss_option_is_a_flag_in_train_and_run(capsys):
    for command in ("train", "run"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        for flag in ("--loss_type", "--loss_weights", "--beta", "--label_smoothing", "--gamma_beta_ratio",
                     "--sft_weight", "--ld_alpha", "--f_divergence_type", "--f_alpha_divergence_coef",
                     "--use_weighting", "--discopop_tau", "--bco_reward_shift", "--load_balancing_loss",
                     "--load_balancing_weight"):
            assert flag in text, (command, flag)


def test_requirements_against_the_store():
    ld = LossConfig(loss_type="dpo", ld_alpha=0.5).requirements
    assert ld.reference and ld.reference_tokens and ld.policy_tokens
    with pytest.raises(ConfigError) as err:
        check_requirements(ld, store="stores/ref", store_token_logps=False, loss_type="dpo")
    text = str(err.value)
    assert "--save_token_logps" in text and "`dpocache score" in text and "stores/ref" in text
    check_requirements(ld, store="stores/ref", store_token_logps=True)
    assert not LossConfig(loss_type="dpo", ld_alpha=1.0).requirements.reference_tokens  # alpha 1: plain sums
    with pytest.raises(ConfigError, match="pass --store"):
        check_requirements(LossConfig(loss_type="ipo").requirements, store=None, store_token_logps=False)
    for name in ("simpo", "orpo", "sft"):
        free = LossConfig(loss_type=name)
        assert free.reference_free
        check_requirements(free.requirements, store=None, store_token_logps=False)
    assert LossConfig(loss_type="dpo", use_weighting=True).requirements.policy_log_sum_sq
    assert LossConfig(load_balancing_loss=True).requirements.router_aux_loss


def test_embedded_demo_sets_its_own_values_only_where_none_were_given():
    train, loss = TrainConfig(), LossConfig()
    assert apply_demo_training_values(train, loss)
    assert train.learning_rate == 2e-5 and loss.loss_type == "dpo_norm" and loss.beta == 5.0
    train, loss = TrainConfig(learning_rate=1e-6), LossConfig(loss_type="dpo")
    assert apply_demo_training_values(train, loss) == []
    assert train.learning_rate == 1e-6 and loss.beta == 0.1
    loss = LossConfig(beta=3.0)
    apply_demo_training_values(TrainConfig(), loss)
    assert loss.beta == 3.0


def test_registry_documents_every_loss():
    for spec in LOSSES.values():
        doc = spec.fn.__doc__ or ""
        assert spec.summary and spec.paper.startswith("https://"), spec.name
        assert len(doc.splitlines()) >= 2 and math.isfinite(spec.default_beta), spec.name
