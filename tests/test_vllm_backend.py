"""vLLM prompt-logprob scoring: parity with HF forward passes, batching under a token budget, and a
vLLM-scored store that trains like an HF-scored one. vLLM must be installed (`make test` installs it):
if it cannot be imported these tests fail, they are never skipped."""

import os

import numpy as np
import pytest
import torch
from conftest import conversational_rows, make_tiny_llama, run_tolerance, write_jsonl
from transformers import AutoModelForCausalLM

from dpocache.artifacts import ReferenceStore
from dpocache.cli import main
from dpocache.logprobs import full_token_logps, pad_batch
from dpocache.stages.train.tracking import read_jsonl
from dpocache.stages.vllm_backend import VLLMOptions, VLLMScorer

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="module")
def model32(tmp_path_factory, tokenizer_dir):
    """head_dim 32 (vLLM's CPU attention needs >= 32): hidden 64, 2 heads. The 49k-token vocabulary
    makes this ~3.2M parameters, the smallest real model vLLM accepts with this tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("llama_hd32"), tokenizer_dir, hidden=64, heads=2)


@pytest.fixture(scope="module")
def scorer(model32):
    s = VLLMScorer(str(model32), VLLMOptions(vllm_dtype="float32", vllm_max_num_batched_tokens=64,
                                             vllm_max_model_len=256), progress=False)
    yield s
    s.close()


def hf_token_logps(model_dir, seq):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids, attn, mask = pad_batch([seq], [[0] + [1] * (len(seq) - 1)], 0)
    with torch.no_grad():
        return full_token_logps(model, ids, attn, mask)[0].double().numpy()


def test_parity_with_hf_fp32(scorer, model32):
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 49152, (n,), generator=g).tolist() for n in (3, 17, 40, 90, 64, 8, 120, 33)]
    got = scorer.token_logps(seqs)  # 90 and 120 exceed the 64-token budget: they go alone
    for seq, values in zip(seqs, got):
        ref = hf_token_logps(model32, seq)
        assert values.shape == (len(seq),) and values[0] == 0.0
        assert np.abs(values - ref).max() < 1e-4
        assert abs(values.sum() - ref.sum()) < 1e-3


def test_too_long_sequence_is_a_clear_error(scorer):
    with pytest.raises(ValueError, match="the vLLM engine accepts fewer than 256"):
        scorer.token_logps([[5] * 300])


def test_vllm_scored_store_trains_like_hf(model32, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", conversational_rows(12, seed=4))
    for backend in ("hf", "vllm"):
        assert main(["score", "--model_name_or_path", str(model32), "--dataset", str(data), "--store",
                     str(tmp_path / backend), "--backend", backend, "--vllm_dtype", "float32",
                     "--vllm_max_model_len", "256"]) == 0
    hf, vl = ReferenceStore.open(tmp_path / "hf"), ReferenceStore.open(tmp_path / "vllm")
    assert vl.identity["backend"] == "vllm" and hf.identity["backend"] == "hf"
    order = sorted(hf.hashes())
    assert sorted(vl.hashes()) == order
    a, _ = hf.read_rows(order)
    b, _ = vl.read_rows(order)
    for col in ("ref_chosen_logps", "ref_rejected_logps"):
        assert np.allclose(a[col].to_numpy(), b[col].to_numpy(), atol=1e-3)
    assert a["ref_chosen_tokens"].to_pylist() == b["ref_chosen_tokens"].to_pylist()

    beta, losses = 0.1, {}
    for backend in ("hf", "vllm"):
        out = tmp_path / f"out-{backend}"
        assert main(["train", "--model_name_or_path", str(model32), "--store", str(tmp_path / backend),
                     "--output_dir", str(out), "--loss_type", "dpo", "--beta", str(beta), "--learning_rate", "1e-3",
                     "--warmup_ratio", "0", "--max_train_steps", "3", "--per_device_train_batch_size", "4",
                     "--checkpointing_steps", "none"]) == 0
        losses[backend] = [r["train_loss"] for r in read_jsonl(out / "metrics.jsonl")]
    # The two runs differ only by the stored reference sums: by delta at most per sum (fp32 vLLM and HF agree to
    # ~1e-5 nats per token). Each pair's dpo loss -logsigmoid(beta * ((pc - pr) - (rc - rr))) has a slope of at
    # most 1 in its argument, so at step 1 (same policy) the mean loss moves by at most 2 * beta * delta; later
    # steps add only what that changes in the gradients (relative ~beta * delta), hence a factor 2 of room.
    delta = max(float(np.abs(a[c].to_numpy() - b[c].to_numpy()).max()) for c in ("ref_chosen_logps",
                                                                              "ref_rejected_logps"))
    assert len(losses["hf"]) == len(losses["vllm"]) == 3
    assert abs(losses["vllm"][0] - losses["hf"][0]) <= 2 * beta * delta + 1e-7 + run_tolerance(0, 1e-5), (delta, losses)
    assert losses["vllm"] == pytest.approx(losses["hf"], abs=4 * beta * delta + 1e-7 + run_tolerance(0, 1e-5)), delta
    assert losses["hf"][0] != pytest.approx(losses["hf"][2], abs=1e-4)  # training moved


def test_store_identity_names_the_dtype_vllm_ran_in(model32, tmp_path, capsys):
    """--dtype sets vLLM's dtype too (--vllm_dtype overrides it); the identity records the one used, so a bf16
    vLLM store is never topped up by an fp32 one."""
    data = write_jsonl(tmp_path / "d.jsonl", conversational_rows(6, seed=8))
    args = ["score", "--model_name_or_path", str(model32), "--dataset", str(data), "--store", str(tmp_path / "s"),
            "--backend", "vllm", "--vllm_max_model_len", "256"]
    assert main(args + ["--dtype", "bfloat16"]) == 0
    store = ReferenceStore.open(tmp_path / "s")
    assert store.identity["dtype"] == "bfloat16"
    capsys.readouterr()
    assert main(args + ["--dtype", "bfloat16", "--vllm_dtype", "float32"]) == 2
    err = capsys.readouterr().err
    assert "scored by another reference" in err and "dtype" in err and "float32" in err
    rows, _ = store.read_rows(sorted(store.hashes()))
    assert main(["score", "--model_name_or_path", str(model32), "--dataset", str(data), "--store",
                 str(tmp_path / "hf")]) == 0  # fp32 HF: bf16 vLLM values are close, not equal
    hf = ReferenceStore.open(tmp_path / "hf")
    exact, _ = hf.read_rows(sorted(hf.hashes()))
    diff = np.abs(rows["ref_chosen_logps"].to_numpy() - exact["ref_chosen_logps"].to_numpy())
    assert 0 < diff.max() < 0.5
