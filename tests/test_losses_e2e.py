"""One store serves every loss: a store scored once (with per-token reference log-probs) trains each
registered loss, and the options that change what a batch must carry, for two steps on a tiny model."""

import math

import pytest
from conftest import conversational_rows, score_rows

from dpocache.cli import _configs, build_parser, main
from dpocache.losses import LossConfig, all_names
from dpocache.stages.train.tracking import read_jsonl

EXTRA = {"exo_pair": ["--label_smoothing", "1e-3"]}
OPTIONS = {  # loss options whose batches carry more than sums: per-token values, WPO statistics, combinations
    "dpo+ld_alpha": ["--loss_type", "dpo", "--ld_alpha", "0.5"],
    "sigmoid+use_weighting": ["--loss_type", "sigmoid", "--use_weighting"],
    "sigmoid_norm+js_divergence": ["--loss_type", "sigmoid_norm", "--f_divergence_type", "js_divergence"],
    "mpo": ["--loss_type", "sigmoid,bco_pair,sft", "--loss_weights", "0.8,0.2,1.0"],
    "dpo+sft_weight": ["--loss_type", "dpo", "--sft_weight", "0.5"],
}


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    return score_rows(tmp_path_factory.mktemp("every_loss"), tiny_model_dir, conversational_rows(16, seed=8),
                      "--save_token_logps")


def train(model, store, out, *args):
    return main(["train", "--model_name_or_path", str(model), "--store", str(store), "--output_dir", str(out),
                 "--max_train_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
                 "--warmup_ratio", "0", "--logging_steps", "1", *args])


def check_metrics(out, loss_args):
    cfg = _configs(build_parser().parse_args(["train", *loss_args]))[-1]
    assert isinstance(cfg, LossConfig)
    rows = read_jsonl(out / "metrics.jsonl")
    assert len(rows) == 2
    for row in rows:
        assert math.isfinite(row["train_loss"]), row
        for name, _ in cfg.components:
            assert math.isfinite(row[f"loss/{name}"]), (name, row)
        assert any(k.startswith("rewards/") for k in row) == (not cfg.reference_free), row


@pytest.mark.parametrize("name", all_names())
def test_one_store_trains_every_loss(tiny_model_dir, store, tmp_path, name):
    args = ["--loss_type", name, *EXTRA.get(name, [])]
    assert train(tiny_model_dir, store, tmp_path / "out", *args) == 0
    check_metrics(tmp_path / "out", args)


@pytest.mark.parametrize("case", sorted(OPTIONS))
def test_one_store_serves_every_loss_option(tiny_model_dir, store, tmp_path, case):
    args = OPTIONS[case]
    assert train(tiny_model_dir, store, tmp_path / "out", *args) == 0
    check_metrics(tmp_path / "out", args)
