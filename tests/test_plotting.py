"""`dpocache plot OUT`: every chart of a real training run is written, held-out figures are drawn when
summary.json has them, the log-prob chart says what the loss used, and a directory without metrics is a
clear error."""

import json

import numpy as np
import pytest
from conftest import conversational_rows, score_rows

from dpocache.cli import main
from dpocache.plotting import ema, logps_label, run_info

CHARTS = ["learning_rate.png", "logps.png", "loss.png", "rewards.png", "rewards_accuracy.png", "rewards_margin.png"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("plot")
    store = score_rows(root, tiny_model_dir, conversational_rows(16, seed=13))
    out = root / "my-run"
    assert main(["train", "--model_name_or_path", str(tiny_model_dir), "--store", str(store), "--output_dir",
                 str(out), "--loss_type", "dpo", "--beta", "0.2", "--learning_rate", "3e-3",
                 "--per_device_train_batch_size", "4", "--max_train_steps", "16", "--checkpointing_steps", "none"]) == 0
    return out


def red_pixels(path) -> int:
    """Pixels of the held-out points' colour (#d62728); the series are blue and orange, the text black."""
    import matplotlib.image

    rgb = matplotlib.image.imread(path)[..., :3]
    return int(((rgb[..., 0] > 0.75) & (rgb[..., 1] < 0.3) & (rgb[..., 2] < 0.3)).sum())


def test_plot_writes_every_chart_and_draws_heldout_points(trained, capsys):
    plots = trained / "plots"
    assert main(["plot", str(trained)]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(p.name for p in plots.iterdir()) == CHARTS  # no temporaries left
    assert sorted(printed) == sorted(str(plots / name) for name in CHARTS)
    assert all(red_pixels(plots / name) == 0 for name in CHARTS)  # no summary.json: no held-out points
    without = {name: (plots / name).read_bytes() for name in CHARTS}

    (trained / "summary.json").write_text(json.dumps({"train_steps": 16, "heldout_examples": 8,
                                                      "heldout_reward_accuracy": 0.75, "heldout_reward_margin": 0.5}))
    try:
        assert main(["plot", str(trained)]) == 0
    finally:
        (trained / "summary.json").unlink()
    for name in ("rewards_accuracy.png", "rewards_margin.png"):
        assert red_pixels(plots / name) > 50, name  # the held-out star
    for name in ("loss.png", "rewards.png", "logps.png", "learning_rate.png"):
        assert (plots / name).read_bytes() == without[name], name  # charts without held-out figures are unchanged


def test_plot_names_the_run_and_what_the_log_probs_are(trained, tmp_path):
    info = run_info(trained)
    assert info.name == "my-run" and info.loss_type == "dpo"  # from the model card's training configuration
    assert "sum" in logps_label("dpo")[1] and "per-token" not in logps_label("dpo")[1]
    assert "per trainable token" in logps_label("dpo_norm")[1]
    summary = {"config": {"loss_type": "dpo_norm", "run_name": "sweep-3"}}
    info = run_info(trained, summary)
    assert (info.name, info.loss_type) == ("sweep-3", "dpo_norm")


def test_ema_is_bias_corrected_and_smooths():
    assert ema([5.0, 5.0, 5.0], 9) == pytest.approx([5.0, 5.0, 5.0])  # no pull towards 0 at the start
    values = np.tile([0.0, 1.0], 50)
    smooth = ema(list(values), 9)
    assert np.ptp(smooth[20:]) < 0.25 * np.ptp(values[20:]) and np.mean(smooth[20:]) == pytest.approx(0.5, abs=0.05)


def test_plot_without_metrics_is_a_clear_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"dpocache plot: error: no metrics.jsonl in {tmp_path}: not a training output directory " \
        "(`dpocache train`/`run` write it there)"
    assert not (tmp_path / "plots").exists()
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["plot", str(tmp_path)]) == 2
    assert "holds no logged steps" in capsys.readouterr().err
