"""Both stages take their device from one place (dpocache.devices), and stage two's batches, model and outputs sit
where it says; host batches are allocated for asynchronous copies only when the device is CUDA."""

import numpy as np
import pytest
import torch
from conftest import conversational_rows, score_rows

from dpocache.config import ConfigError, build
from dpocache.devices import local_rank, pin_host_memory, resolve_device, to_device
from dpocache.modeling import ModelConfig
from dpocache.stages.train import Recipe, TrainConfig
from dpocache.stages.train.loader import Collator
from dpocache.stages.train.source import PairBatch, Side


def test_resolve_device_defaults_and_overrides(monkeypatch):
    default = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto") == default
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_rank() == 3
    if torch.cuda.is_available():
        assert resolve_device(None) == torch.device("cuda", 3 % torch.cuda.device_count())
    else:
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("gpu0")


def test_pinned_host_memory_only_for_cuda():
    assert pin_host_memory(torch.device("cuda", 1)) is True
    assert pin_host_memory("cuda") is True
    assert pin_host_memory("cpu") is False
    t = torch.ones(3)
    assert to_device(t, "cpu") is t  # already there: no copy


def pairs():
    ids = [np.array([5, 6, 7], np.int32), np.array([8, 9], np.int32)]
    masks = [np.array([0, 1, 1], np.int8), np.array([0, 1], np.int8)]

    def side(seqs, ms):
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
        return Side(np.concatenate(seqs), np.concatenate(ms), offsets)

    ref = np.array([[-1.0, -2.0, 2, 1]])
    return PairBatch(np.array([0]), side(ids[:1], masks[:1]), side(ids[1:], masks[1:]), ref,
                     np.array([b"a" * 64]))


def test_collator_layout_and_pin_flag():
    batch = Collator(0, pad_to_multiple_of=4)(pairs())
    assert batch.input_ids.tolist() == [[5, 6, 7, 0], [8, 9, 0, 0]]
    assert batch.mask.tolist() == [[0, 1, 1, 0], [0, 1, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert batch.num_tokens == 5 and not batch.input_ids.is_pinned()
    packed = Collator(0, packing=True)(pairs()).packed
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9]] and packed.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    # pinned allocation is what a CUDA run asks for; on a machine without CUDA PyTorch has no pinned allocator
    if torch.cuda.is_available():
        assert Collator(0, pin=True)(pairs()).input_ids.is_pinned()
    else:
        with pytest.raises(RuntimeError, match="pin_memory"):
            Collator(0, pin=True)(pairs())


def test_trainer_takes_its_device_from_one_place(tiny_model_dir, tmp_path_factory, tmp_path):
    store = score_rows(tmp_path_factory.mktemp("dev_store"), tiny_model_dir, conversational_rows(8, seed=2))
    (cfg,) = build([TrainConfig], dict(store=str(store), output_dir=str(tmp_path / "o"), device="cpu",
                                       max_train_steps=1, per_device_train_batch_size=2, checkpointing_steps=None))
    recipe = Recipe(ModelConfig(model_name_or_path=str(tiny_model_dir)), cfg, show_progress=False).setup()
    device = resolve_device(cfg.device)
    assert recipe.device == device == recipe.accelerator.device
    assert {p.device for p in recipe.model.parameters()} == {device}
    assert recipe.collate.pin is False and recipe.collate.multiple == 1  # CPU: no pinning, no length padding
    batch = recipe.collate(recipe.data.source.read([0, 1])).to(recipe.device)
    assert batch.input_ids.device == batch.reference.device == device
    recipe.train()
    assert recipe.history[0]["training_step"] == 1


def test_trained_positions_come_from_the_host(tiny_model_dir):
    """The collator computes which positions are trained on the host, so the forward never asks the device
    (torch.nonzero on CUDA waits for the GPU); the result is the same as finding them on the device."""
    from transformers import AutoModelForCausalLM

    from dpocache.logprobs import selected_token_logps, trained_positions

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = Collator(0, pad_to_multiple_of=4)(pairs())
    assert batch.positions.tolist() == [[0, 0, 1], [0, 1, 0]]  # (row, column) whose next token is trained
    assert torch.equal(batch.positions, trained_positions(batch.mask))
    with torch.no_grad():
        a = selected_token_logps(model, batch.input_ids, batch.attention_mask, batch.mask)
        b = selected_token_logps(model, batch.input_ids, batch.attention_mask, batch.mask, positions=batch.positions)
    assert torch.equal(a, b)
