"""Padding-free batches (--packing): packed log-probs and gradients equal padded ones on several real
architectures and attention implementations, a packed training run reproduces the padded one (and its model
really sees one padding-free row per micro-batch), and the start-up probe refuses a model whose attention
crosses sequence boundaries."""

import inspect

import pytest
import torch
from conftest import conversational_rows, run_tolerance, score_rows
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    FalconForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from dpocache.artifacts import ReferenceStore
from dpocache.cli import main
from dpocache.config import ConfigError
from dpocache.logprobs import TokenLogps, pad_batch
from dpocache.stages.train.forward import policy_logps
from dpocache.stages.train.loader import Collator
from dpocache.stages.train.packing import pack_batch, packing_probe, require_packing, sequence_sums
from dpocache.stages.train.source import StoreSource
from dpocache.stages.train.store_index import list_index
from dpocache.stages.train.tracking import read_jsonl

SMALL = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ARCHS = {
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL)),
    "olmo2": lambda: Olmo2ForCausalLM(Olmo2Config(**SMALL)),
    # a sliding window shorter than the sequences: the window and the boundaries must both hold
    "mistral_sliding": lambda: MistralForCausalLM(MistralConfig(**SMALL, sliding_window=4)),
}


def sequences(vocab: int, lengths=(9, 4, 13, 6, 1, 11), seed: int = 0):
    """Random ids; masks mark the second half trainable and (deliberately) the first token too."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    masks = [[1] + [0] * (n // 2) + [1] * (n - 1 - n // 2) for n in lengths]
    return seqs, masks


def padded_and_packed(logp_model, seqs, masks):
    ids, attn, tmask = pad_batch(seqs, masks, pad_id=0)
    padded = logp_model(ids, attn, tmask)
    batch = pack_batch(seqs, masks)
    packed = logp_model(batch.input_ids, None, batch.mask, batch.position_ids)
    return (padded.sum(-1), tmask[:, 1:].sum(-1)), sequence_sums(packed, batch)


def build(arch: str, impl: str, tiny_model_dir):
    if arch == "llama":
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=impl)
    torch.manual_seed(0)
    model = ARCHS[arch]()
    model.set_attn_implementation(impl)
    return model


def test_pack_batch_layout():
    batch = pack_batch([[5, 6, 7], [8], [9, 10]], [[1, 1, 1], [1], [0, 0]])
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert batch.mask.tolist() == [[0, 1, 1, 0, 0, 0]]  # never the first token of a sequence
    assert batch.segment_ids.tolist() == [0, 0, 0, 1, 2, 2]
    assert (batch.num_sequences, batch.num_tokens) == (3, 6)
    sums, counts = sequence_sums(torch.tensor([[0.0, 1.0, 2.0, 0.0, 0.0, 0.0]]), batch)
    assert sums.tolist() == [3.0, 0.0, 0.0] and counts.tolist() == [2, 0, 0]
    with pytest.raises(ValueError, match="sequence 1"):
        pack_batch([[1, 2], []], [[0, 1], []])
    with pytest.raises(ValueError, match="as many masks"):
        pack_batch([[1, 2]], [])


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", *ARCHS])
def test_packed_sums_equal_padded(arch, impl, tiny_model_dir):
    model = build(arch, impl, tiny_model_dir).eval()
    assert model.config._attn_implementation == impl
    seqs, masks = sequences(model.config.vocab_size)
    for selected in (True, False):
        with torch.no_grad():
            (pad_sums, pad_counts), (pk_sums, pk_counts) = padded_and_packed(
                TokenLogps(model, selected=selected), seqs, masks)
        assert pk_counts.tolist() == pad_counts.tolist()
        assert torch.allclose(pk_sums, pad_sums, atol=1e-5, rtol=0), (pk_sums - pad_sums).abs().max()
    # without the boundaries (one causal row over everything) the later sequences would differ
    batch = pack_batch(seqs, masks)
    with torch.no_grad():
        leaky = TokenLogps(model)(batch.input_ids, torch.ones_like(batch.input_ids), batch.mask)
    assert not torch.allclose(sequence_sums(leaky, batch)[0], pad_sums, atol=1e-5, rtol=0)
    assert require_packing(TokenLogps(model)) <= 1e-5


def test_packed_gradients_equal_padded(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).train()
    seqs, masks = sequences(model.config.vocab_size, seed=1)
    weights = torch.linspace(0.5, 2.0, len(seqs))
    grads = []
    for packed in (False, True):
        model.zero_grad()
        (pad_sums, _), (pk_sums, _) = padded_and_packed(TokenLogps(model, chunk=4), seqs, masks)
        ((pk_sums if packed else pad_sums) * weights).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=0), (grads[0] - grads[1]).abs().max()


def falcon_dir(out, tokenizer_dir):
    """A tiny Falcon (rotary): it takes position ids but builds its mask without them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = FalconForCausalLM(FalconConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2,
                                           num_attention_heads=2, alibi=False, new_decoder_architecture=False,
                                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                           pad_token_id=tok.pad_token_id))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_probe_rejects_attention_that_crosses_boundaries(tmp_path, tokenizer_dir):
    model = AutoModelForCausalLM.from_pretrained(falcon_dir(tmp_path / "falcon", tokenizer_dir),
                                                 dtype=torch.float32).train()
    logp_model = TokenLogps(model)
    gap, leak = packing_probe(logp_model)
    assert gap > 1e-3 and leak > 1e-3
    assert model.training  # the probe gives the training mode back
    with pytest.raises(ConfigError, match=r"model type 'falcon' with attn_implementation '(sdpa|eager)'") as err:
        require_packing(logp_model)
    impl = model.config._attn_implementation
    assert "change when the sequences packed before it change" in str(err.value)
    suggested = str(err.value).split("try another --attn_implementation")[1]
    assert impl not in suggested  # never recommends the setting it refused


def test_probe_accepts_bf16_autocast_compute():
    """Under bf16 autocast packed and padded log-probs differ by bf16 rounding, not by leaking: the probe judges
    with the tolerance of the compute dtype (an fp32 tolerance refused such models), and the leak check is exact."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL, attn_implementation="sdpa")).eval()
    logp_model = TokenLogps(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gap, leak = packing_probe(logp_model)
        assert leak == 0.0
        assert gap > 1e-4  # bf16 rounding: an fp32 tolerance would refuse this model
        assert require_packing(logp_model, compute_dtype=torch.bfloat16) == gap
        with pytest.raises(ConfigError, match="tolerance 0.0001 for float32 compute"):
            require_packing(logp_model, compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def scored_store(tmp_path_factory, tiny_model_dir):
    return score_rows(tmp_path_factory.mktemp("packing_store"), tiny_model_dir, conversational_rows(16, seed=5),
                      "--store_dataset", "d")


def test_packed_batch_equals_padded_batch(tiny_model_dir, scored_store):
    store = ReferenceStore.open(scored_store)
    source = StoreSource(store.root, list_index(store, "d"))
    logp_model = TokenLogps(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval())
    pairs = source.read([0, 3, 7, 11])
    with torch.no_grad():
        pad = policy_logps(logp_model, Collator(0)(pairs)).logps
        pk = policy_logps(logp_model, Collator(0, packing=True)(pairs)).logps
    for a, b in zip((pad.chosen_sum, pad.rejected_sum), (pk.chosen_sum, pk.rejected_sum)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert pk.chosen_count.tolist() == pad.chosen_count.tolist()
    assert pk.rejected_count.tolist() == pad.rejected_count.tolist()
    assert Collator(0, packing=True)(pairs).packed.input_ids.shape == (1, pairs.num_tokens)


def train_args(model, store, out, *extra):
    return ["train", "--model_name_or_path", str(model), "--store", str(store), "--output_dir", str(out),
            "--loss_type", "dpo", "--beta", "0.2", "--learning_rate", "1e-3", "--warmup_ratio", "0",
            "--per_device_train_batch_size", "4", "--max_train_steps", "3", "--dtype", "float32", *extra]


def record_decoder_inputs(monkeypatch) -> list[dict]:
    """What reaches the real Llama decoder in each forward that builds a graph (training, not the probes)."""
    from transformers.models.llama.modeling_llama import LlamaModel

    calls, real = [], LlamaModel.forward
    signature = inspect.signature(real)

    def forward(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs).arguments
        if torch.is_grad_enabled():
            pos = bound.get("position_ids")
            calls.append({"shape": tuple(bound["input_ids"].shape), "mask": bound.get("attention_mask"),
                          "starts": None if pos is None else int((pos == 0).sum())})
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LlamaModel, "forward", forward)
    return calls


def test_packed_training_reproduces_padded_losses(tiny_model_dir, scored_store, tmp_path, monkeypatch):
    calls = record_decoder_inputs(monkeypatch)
    padded, packed = tmp_path / "padded", tmp_path / "packed"
    assert main(train_args(tiny_model_dir, scored_store, padded)) == 0
    padded_calls = list(calls)
    calls.clear()
    assert main(train_args(tiny_model_dir, scored_store, packed, "--packing")) == 0
    # padded: 3 micro-batches of 4 pairs, chosen and rejected as 8 padded rows
    assert len(padded_calls) == 3 and all(c["shape"][0] == 8 and c["mask"] is not None for c in padded_calls)
    # packed: the same 3 micro-batches, each ONE row without padding or attention mask holding 8 sequences
    assert len(calls) == 3, calls
    for pad, pk in zip(padded_calls, calls):
        assert pk["shape"][0] == 1 and pk["mask"] is None and pk["starts"] == 8, pk
        assert pk["shape"][1] == int(pad["mask"].sum())  # exactly the real tokens of the padded batch
    lp = [r["train_loss"] for r in read_jsonl(padded / "metrics.jsonl")]
    lk = [r["train_loss"] for r in read_jsonl(packed / "metrics.jsonl")]
    assert len(lp) == len(lk) == 3
    assert lk == pytest.approx(lp, abs=run_tolerance(1e-5, 1e-4))
    assert lp[0] != pytest.approx(lp[2], abs=1e-4)  # training moved


def test_train_refuses_packing_for_a_model_that_ignores_boundaries(scored_store, tokenizer_dir, tmp_path, capsys):
    model = falcon_dir(tmp_path / "falcon", tokenizer_dir)
    assert main(train_args(model, scored_store, tmp_path / "out", "--packing")) == 2
    err = capsys.readouterr().err
    assert "--packing" in err and "'falcon'" in err and "attn_implementation" in err
