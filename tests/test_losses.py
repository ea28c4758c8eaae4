"""Each loss and every logged metric against values computed by hand (plain ``math``)."""

import math

import pytest
import torch

from dpocache.losses import SequenceLogps, batch_metrics, preference_loss

# Two examples: policy and reference sums and counts.
PI = dict(c=[-10.0, -4.0], r=[-12.0, -3.0], nc=[5, 2], nr=[4, 3])
REF = dict(c=[-11.0, -4.5], r=[-11.5, -2.0], nc=[5, 2], nr=[4, 3])


def seq(d):
    return SequenceLogps(torch.tensor(d["c"], dtype=torch.float64), torch.tensor(d["r"], dtype=torch.float64),
                         torch.tensor(d["nc"]), torch.tensor(d["nr"]))


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def per_example(avg: bool):
    out = []
    for i in range(2):
        pc, pr, rc, rr = PI["c"][i], PI["r"][i], REF["c"][i], REF["r"][i]
        if avg:
            pc, rc = pc / PI["nc"][i], rc / REF["nc"][i]
            pr, rr = pr / PI["nr"][i], rr / REF["nr"][i]
        out.append((pc, pr, rc, rr))
    return out


@pytest.mark.parametrize("loss_type,avg", [("dpo", False), ("dpo_norm", True)])
@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_dpo_and_dpo_norm(loss_type, avg, ls):
    beta = 0.7
    out = preference_loss(loss_type, seq(PI), seq(REF), beta=beta, label_smoothing=ls)
    for i, (pc, pr, rc, rr) in enumerate(per_example(avg)):
        d = (pc - pr) - (rc - rr)
        expected = -logsig(beta * d) * (1 - ls) - logsig(-beta * d) * ls
        assert out.losses[i].item() == pytest.approx(expected, rel=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (pc - rc))
        assert out.rejected_rewards[i].item() == pytest.approx(beta * (pr - rr))
        assert out.chosen_logps[i].item() == pytest.approx(pc)


def test_simpo_is_reference_free():
    beta, gamma = 2.0, 0.5
    out = preference_loss("simpo", seq(PI), None, beta=beta, gamma_beta_ratio=gamma)
    for i, (pc, pr, _, _) in enumerate(per_example(True)):
        assert out.losses[i].item() == pytest.approx(-logsig(beta * ((pc - pr) - gamma)))
    assert out.chosen_rewards is None
    assert "rewards/accuracy" not in batch_metrics(out)


def test_wpo_weights_each_example():
    beta = 0.5
    out = preference_loss("wpo", seq(PI), seq(REF), beta=beta)
    for i, (pc, pr, rc, rr) in enumerate(per_example(False)):
        w = min(1.0, math.exp(PI["c"][i] / PI["nc"][i] + PI["r"][i] / PI["nr"][i]))
        expected = -logsig(beta * ((pc - pr) - (rc - rr))) * w
        assert out.losses[i].item() == pytest.approx(expected, rel=1e-12)
    # The two examples have different weights: per-example, not a batch-wide broadcast.
    assert out.losses[0].item() != pytest.approx(out.losses[1].item())


def test_ipo_hinge_robust():
    beta = 0.4
    ipo = preference_loss("ipo", seq(PI), seq(REF), beta=beta)
    hinge = preference_loss("hinge", seq(PI), seq(REF), beta=beta)
    robust = preference_loss("robust", seq(PI), seq(REF), beta=beta, label_smoothing=0.1)
    for i in range(2):
        pc, pr, rc, rr = per_example(True)[i]
        assert ipo.losses[i].item() == pytest.approx(((pc - pr) - (rc - rr) - 1 / (2 * beta)) ** 2)
        pc, pr, rc, rr = per_example(False)[i]
        d = (pc - pr) - (rc - rr)
        assert hinge.losses[i].item() == pytest.approx(max(0.0, 1 - beta * d))
        assert robust.losses[i].item() == pytest.approx((-(0.9) * logsig(beta * d) + 0.1 * logsig(-beta * d)) / 0.8)


def test_sft_term_adds_chosen_nll_per_token():
    base = preference_loss("dpo", seq(PI), seq(REF), beta=0.1)
    with_sft = preference_loss("dpo", seq(PI), seq(REF), beta=0.1, sft_weight=0.5)
    for i in range(2):
        assert (with_sft.losses[i] - base.losses[i]).item() == pytest.approx(0.5 * -(PI["c"][i] / PI["nc"][i]))


def test_all_masked_row_averages_to_zero_not_nan():
    s = SequenceLogps(torch.tensor([0.0]), torch.tensor([-3.0]), torch.tensor([0]), torch.tensor([3]))
    assert s.chosen_avg().item() == 0.0
    out = preference_loss("dpo_norm", s, s, beta=1.0)
    assert torch.isfinite(out.losses).all()


def test_batch_metrics_names_and_values():
    beta = 0.7
    out = preference_loss("dpo", seq(PI), seq(REF), beta=beta)
    m = batch_metrics(out)
    rc = [beta * (PI["c"][i] - REF["c"][i]) for i in range(2)]
    rr = [beta * (PI["r"][i] - REF["r"][i]) for i in range(2)]
    assert m["logps/chosen"] == pytest.approx(sum(PI["c"]) / 2)
    assert m["logps/rejected"] == pytest.approx(sum(PI["r"]) / 2)
    assert m["rewards/chosen"] == pytest.approx(sum(rc) / 2)
    assert m["rewards/rejected"] == pytest.approx(sum(rr) / 2)
    assert m["rewards/average"] == pytest.approx((sum(rc) + sum(rr)) / 4)
    assert m["rewards/margin"] == pytest.approx(sum(a - b for a, b in zip(rc, rr)) / 2)
    assert m["rewards/accuracy"] == pytest.approx(sum(a > b for a, b in zip(rc, rr)) / 2)
    assert m["train_loss"] == pytest.approx(out.losses.mean().item())


def test_unknown_loss_and_missing_reference_are_errors():
    with pytest.raises(ValueError, match="unknown loss_type"):
        preference_loss("nope", seq(PI), seq(REF), beta=1.0)
    with pytest.raises(ValueError, match="needs reference"):
        preference_loss("dpo", seq(PI), None, beta=1.0)
