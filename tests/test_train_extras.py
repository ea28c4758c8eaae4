"""LoRA (train, save the adapter or merged weights, reload) and the MoE load-balancing loss (tiny OLMoE)."""

import json

import pytest
import torch
from conftest import conversational_rows, run_tolerance, score_rows, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer, OlmoeConfig, OlmoeForCausalLM

from dpocache.cli import main
from dpocache.stages.train.tracking import read_jsonl


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    return score_rows(tmp_path_factory.mktemp("extras"), tiny_model_dir, conversational_rows(16, seed=9))


def lora_args(model, store, out, *extra):
    return ["train", "--model_name_or_path", str(model), "--store", str(store), "--output_dir", str(out),
            "--use_lora", "--lora_rank", "4", "--lora_alpha", "8", "--lora_dropout", "0", "--learning_rate", "1e-2",
            "--loss_type", "dpo", "--beta", "0.5", "--max_train_steps", "3", "--per_device_train_batch_size", "4",
            "--warmup_ratio", "0", *extra]


def test_lora_adapter_and_merged_weights(tiny_model_dir, store, tmp_path):
    from peft import PeftModel

    adapter = tmp_path / "adapter"
    assert main(lora_args(tiny_model_dir, store, adapter)) == 0
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    losses = [r["train_loss"] for r in read_jsonl(adapter / "metrics.jsonl")]
    assert losses[-1] < losses[0]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, adapter)

    merged = tmp_path / "merged"
    assert main(lora_args(tiny_model_dir, store, merged, "--merge_lora")) == 0
    assert not (merged / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(merged)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        a = peft_model(input_ids=ids).logits
        b = model(input_ids=ids).logits
        c = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)  # same training, merged == adapter on the base
    assert not torch.allclose(b, c, atol=1e-4)  # and training changed the model


def test_olmoe_load_balancing_loss(tmp_path, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = OlmoeConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model_dir = tmp_path / "olmoe"
    OlmoeForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "d.jsonl", conversational_rows(8, seed=3))
    assert main(["score", "--model_name_or_path", str(model_dir), "--dataset", str(data),
                 "--store", str(tmp_path / "store")]) == 0
    out = tmp_path / "out"
    assert main(["train", "--model_name_or_path", str(model_dir), "--store", str(tmp_path / "store"),
                 "--output_dir", str(out), "--load_balancing_loss", "--load_balancing_weight", "0.01",
                 "--max_train_steps", "2", "--per_device_train_batch_size", "4"]) == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert all(r["aux_loss"] > 0 for r in rows)
    # without the flag the metric is absent
    assert main(["train", "--model_name_or_path", str(model_dir), "--store", str(tmp_path / "store"),
                 "--output_dir", str(tmp_path / "plain"), "--max_train_steps", "1"]) == 0
    assert "aux_loss" not in read_jsonl(tmp_path / "plain" / "metrics.jsonl")[0]
    assert json.loads((out / "config.json").read_text())["model_type"] == "olmoe"


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_tracking_writes_offline_runs(tiny_model_dir, store, tmp_path, monkeypatch, tracker, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "o"
    assert main(["train", "--model_name_or_path", str(tiny_model_dir), "--store", str(store), "--output_dir", str(out),
                 "--max_train_steps", "2", "--with_tracking", "--report_to", tracker]) == 0
    if tracker == "tensorboard":
        assert list(out.rglob("events.out.tfevents.*"))
    else:
        runs = list((out / "wandb").glob("offline-run-*"))
        assert runs and list(runs[0].glob("*.wandb"))
    captured = capsys.readouterr()
    assert "x" * 40 not in captured.out + captured.err


HEAP_PROBE = """
import json, os
from dpocache.stages.train.extras import heap_trimmer

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

release = heap_trimmer(min_free_mb=64)
base = rss()
blocks = [bytearray(64 * 1024) for _ in range(4000)]  # ~250 MB in heap chunks (below the mmap threshold)
pin = bytearray(64 * 1024)  # keeps the top of the heap in use, so free() alone cannot shrink it
peak = rss()
del blocks
freed = rss()
trimmed = release()
print(json.dumps({"base": base, "peak": peak, "freed": freed, "trimmed": trimmed, "after": rss(),
                  "below_limit": heap_trimmer(min_free_mb=10**6)()}))
"""


def test_heap_trimmer_returns_freed_heap_pages_to_the_system():
    """Freed chunks below the top of glibc's heap stay resident until trimmed; the trimmer gives them back.
    Measured in a fresh interpreter (a long-lived process may hold free resident heap that new blocks reuse), with
    bounds relative to what the blocks took (memory figures of real runs are measured in bench/)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads(done.stdout.strip().splitlines()[-1])
    took = m["peak"] - m["base"]
    assert took > 2**27, m  # the blocks were resident
    assert m["trimmed"] is True, m  # at least 64 MiB sat free in the heap: trimmed (Linux/glibc)
    assert m["after"] < m["base"] + took / 2, m  # most of what the blocks took is back with the system
    assert m["below_limit"] is False, m  # below the limit: no trim


def _dropout_models(tokenizer_dir):
    """A Llama whose attention applies its dropout rate itself and a GPT-2 with nn.Dropout modules."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, attention_dropout=0.5,
                                         tie_word_embeddings=True))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.3,
                                      embd_pdrop=0.3, attn_pdrop=0.3))
    return {"llama": llama, "gpt2": gpt2}


def test_disable_dropout_makes_training_mode_deterministic(tokenizer_dir):
    from dpocache.stages.train.extras import disable_dropout

    ids = torch.arange(5, 45).view(2, 20)
    for name, model in _dropout_models(tokenizer_dir).items():
        model.eval()
        with torch.no_grad():
            reference = model(input_ids=ids).logits
        model.train()
        with torch.no_grad():
            assert not torch.allclose(model(input_ids=ids).logits, reference), name  # dropout is live
        assert disable_dropout(model) > 0, name
        with torch.no_grad():
            a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
        assert torch.equal(a, b) and torch.allclose(a, reference, atol=1e-6), name
        assert disable_dropout(model) == 0  # nothing left to zero
    assert _dropout_models(tokenizer_dir)["llama"].config.attention_dropout == 0.5  # configs stay as they are


def test_first_dpo_step_sees_policy_equal_to_reference(tmp_path, tokenizer_dir):
    """With dropout off the policy's first forward equals the stored reference: the DPO loss is log 2 exactly."""
    model_dir = tmp_path / "llama_dropout"
    _dropout_models(tokenizer_dir)["llama"].save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(model_dir)
    store = score_rows(tmp_path, model_dir, conversational_rows(8, seed=4))

    def first_step(out, *extra):
        assert main(["train", "--model_name_or_path", str(model_dir), "--store", str(store), "--output_dir",
                     str(out), "--loss_type", "dpo", "--beta", "1", "--max_train_steps", "1",
                     "--per_device_train_batch_size", "8", *extra]) == 0
        return read_jsonl(out / "metrics.jsonl")[0]

    off = first_step(tmp_path / "off")
    tol = run_tolerance(1e-5, 1e-3)  # on a GPU, the scoring and training kernels round differently
    assert off["train_loss"] == pytest.approx(0.693147, abs=tol)
    assert off["rewards/margin"] == pytest.approx(0.0, abs=tol)
    on = first_step(tmp_path / "on", "--disable_dropout", "false")
    assert abs(on["rewards/margin"]) > 1e-3  # dropout in the policy alone shifts every log-ratio


def test_import_asks_pytorch_for_huge_pages_unless_the_environment_says_otherwise():
    import os
    import subprocess
    import sys

    code = "import dpocache, os; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "1"
    assert subprocess.run([sys.executable, "-c", code], env=dict(env, THP_MEM_ALLOC_ENABLE="0"), capture_output=True,
                          text=True, check=True).stdout.strip() == "0"
