"""Efficiency switches of stage two change cost, not results: chunked log-probs vs full logits, partial
gradient checkpointing (activation memory budget; the layers really are recomputed in backward), the Liger
switch (its kernels on a GPU, a message and the plain kernels without one); bf16 autocast really computes in
bf16 while staying close to fp32. Tolerances depend on the device the code runs on (exact CPU kernels,
non-deterministic CUDA reductions)."""

from collections import Counter

import pytest
import torch
from conftest import conversational_rows, make_tiny_llama, run_tolerance, score_rows
from transformers import AutoModelForCausalLM

from dpocache.cli import main
from dpocache.stages.train.extras import enable_gradient_checkpointing
from dpocache.stages.train.tracking import read_jsonl

KEYS = ("train_loss", "logps/chosen", "logps/rejected", "rewards/margin", "grad_norm")


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory, tokenizer_dir):
    return make_tiny_llama(tmp_path_factory.mktemp("deep"), tokenizer_dir, hidden=32, layers=4, heads=2, seed=3)


@pytest.fixture(scope="module")
def store(tmp_path_factory, deep_model):
    return score_rows(tmp_path_factory.mktemp("eff"), deep_model, conversational_rows(16, seed=21))


def train(model, store, out, *extra):
    assert main(["train", "--model_name_or_path", str(model), "--store", str(store), "--output_dir", str(out),
                 "--loss_type", "dpo", "--beta", "0.3", "--learning_rate", "3e-3", "--warmup_ratio", "0",
                 "--per_device_train_batch_size", "4", "--max_train_steps", "3", "--checkpointing_steps", "none",
                 *extra]) == 0
    return read_jsonl(out / "metrics.jsonl")


@pytest.fixture(scope="module")
def baseline_dir(deep_model, store, tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    train(deep_model, store, out)
    return out


@pytest.fixture(scope="module")
def baseline(baseline_dir):
    return read_jsonl(baseline_dir / "metrics.jsonl")


def assert_same(a, b, tol):
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        for key in KEYS:
            assert rb[key] == pytest.approx(ra[key], abs=tol, rel=tol), (ra["training_step"], key)


def test_full_logits_path_trains_identically(deep_model, store, baseline, tmp_path, capsys):
    plain = train(deep_model, store, tmp_path / "plain", "--fused_logps", "false")
    assert "log-probs: full logits; AdamW: fused" in capsys.readouterr().out
    assert_same(baseline, plain, run_tolerance(1e-5, 1e-4))


def test_fused_and_for_each_adamw_train_alike(deep_model, store, baseline, baseline_dir, tmp_path, capsys):
    loop = train(deep_model, store, tmp_path / "loop", "--fused_optimizer", "false")
    assert "AdamW: for-each" in capsys.readouterr().out
    assert_same(baseline, loop, run_tolerance(1e-5, 1e-4))  # steps 2 and 3 see the weights each optimizer produced
    start, fused, for_each = (AutoModelForCausalLM.from_pretrained(p).state_dict()
                              for p in (deep_model, baseline_dir, tmp_path / "loop"))
    moved = max((fused[k] - start[k]).abs().max().item() for k in start)
    apart = max((fused[k] - for_each[k]).abs().max().item() for k in start)
    assert moved > 1e-3 and apart < run_tolerance(1e-6, 1e-5)


def test_activation_memory_budget_checkpoints_a_fraction_of_layers(deep_model):
    from transformers.modeling_layers import GradientCheckpointingLayer

    for budget, expected in ((0.0, [True] * 4), (0.5, [True, True, False, False]), (1.0, [False] * 4)):
        model = AutoModelForCausalLM.from_pretrained(deep_model)
        assert enable_gradient_checkpointing(model, budget) == sum(expected)
        flags = [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert flags == expected, budget


def count_decoder_layer_calls(monkeypatch) -> list[tuple[int, bool]]:
    """Record (layer index, inside backward) for every call of the real Llama decoder layer's forward."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    calls, real = [], LlamaDecoderLayer.forward

    def forward(self, *args, **kwargs):
        calls.append((self.self_attn.layer_idx, torch._C._current_graph_task_id() != -1))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LlamaDecoderLayer, "forward", forward)
    return calls


@pytest.mark.parametrize("budget, recomputed", [(None, []), ("0", [0, 1, 2, 3]), ("0.5", [0, 1])])
def test_gradient_checkpointing_recomputes_layers_and_keeps_results(deep_model, store, baseline, tmp_path, budget,
                                                                    recomputed, monkeypatch):
    calls = count_decoder_layer_calls(monkeypatch)
    flags = [] if budget is None else ["--gradient_checkpointing", "--activation_memory_budget", budget]
    run = train(deep_model, store, tmp_path / "gc", *flags)
    assert_same(baseline, run, run_tolerance(1e-6, 1e-5))
    # each checkpointed layer runs its forward again in backward: once per micro-batch (3 steps of one)
    assert Counter(i for i, in_backward in calls if in_backward) == {i: 3 for i in recomputed}
    assert Counter(i for i, in_backward in calls if not in_backward)[3] >= 3  # the forward passes themselves


def test_liger_switch(deep_model, store, baseline, tmp_path, capsys):
    run = train(deep_model, store, tmp_path / "liger", "--use_liger_kernel")
    out = capsys.readouterr().out
    if torch.cuda.is_available():  # Liger's kernels really run: close to, not equal to, the plain kernels
        assert "Liger kernels applied" in out
        assert_same(baseline, run, 1e-3)
    else:  # no GPU: a clear message and exactly the plain run
        assert "need a CUDA GPU" in out
        assert_same(baseline, run, 0)


def test_bf16_autocast_is_close_to_fp32_but_not_equal(deep_model, store, baseline, tmp_path):
    run = train(deep_model, store, tmp_path / "bf16", "--bf16")
    first, ref = run[0], baseline[0]
    diff = abs(first["logps/chosen"] - ref["logps/chosen"])
    assert 0 < diff < 0.05 * abs(ref["logps/chosen"])  # computed in bf16, yet close to fp32
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in run)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert next(saved.parameters()).dtype == torch.float32  # weights and AdamW stay fp32
