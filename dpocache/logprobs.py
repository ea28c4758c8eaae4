"""Per-token log-probs of the labels, computed only where they are needed.

A causal LM's log-prob of token ``t`` comes from the logits at position ``t - 1``. DPO needs it only
at trainable (assistant) tokens, so instead of materialising the full ``[B, T, V]`` logits we run the
decoder, pick the hidden states of the positions that predict a trainable token, and apply the output
head to those rows only, in chunks (fp32 log-softmax). Under autograd the first chunks keep their
``[chunk, V]`` logits for backward while they fit in ``keep_mb``; the chunks beyond are checkpointed
(their logits are recomputed in backward instead of being kept), so memory stays bounded whatever the
batch, and small batches pay no recomputation.

This "selected positions" path is exact for every model whose logits are ``lm_head(hidden)``, and for
the logit transforms transformers' models apply after the head and name in their config (Gemma 2/3's
final soft-capping, Cohere's ``logit_scale``, Granite's ``logits_scaling``), which it applies too. Any
other model is checked by a probe comparing the path with the model's own forward on a short input;
models that disagree fall back to the full-logits path.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK = 1024
DEFAULT_KEEP_MB = 1024.0


def logit_transform(config):
    """The function a model applies to ``lm_head(hidden)`` to get its logits, read from its config (None: the
    identity): Gemma 2/3 ``final_logit_softcapping``, Cohere ``logit_scale``, Granite ``logits_scaling``."""
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divisor = getattr(config, "logits_scaling", None)
    steps = []
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale != 1:
        steps.append(lambda x: x * scale)
    if isinstance(divisor, (int, float)) and not isinstance(divisor, bool) and divisor != 1:
        steps.append(lambda x: x / divisor)
    if isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap:
        steps.append(lambda x: torch.tanh(x / cap) * cap)
    if not steps:
        return None

    def transform(logits: torch.Tensor) -> torch.Tensor:
        for step in steps:
            logits = step(logits)
        return logits

    return transform


def _head_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, transform=None) -> torch.Tensor:
    logits = head(hidden).float()
    if transform is not None:
        logits = transform(logits)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``tensor``'s device runs in right now (the autocast dtype when autocast is on)."""
    kind = tensor.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return tensor.dtype


class _LinearHeadLogps(torch.autograd.Function):
    """log p(target) through a plain linear output head, keeping ONE ``[rows, V]`` fp32 tensor for backward
    (the softmax, overwritten in place by its own gradient) instead of autograd's logits + temporaries.

    The matmuls of forward AND backward run in the compute dtype of the forward (bf16 under autocast, with
    fp32 accumulation inside the GEMM); the log-softmax and its gradient stay fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        logits = nn.functional.linear(hidden, weight, bias).float()
        lse = torch.logsumexp(logits, dim=-1)
        out = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
        probs = logits.sub_(lse[:, None]).exp_()
        ctx.save_for_backward(hidden, weight, probs, targets)
        ctx.has_bias = bias is not None
        ctx.compute_dtype = _compute_dtype(hidden) if hidden.dtype == weight.dtype else torch.promote_types(
            _compute_dtype(hidden), weight.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, probs, targets = ctx.saved_tensors
        g = probs.mul_(-grad[:, None])  # d out / d logits = onehot(target) - softmax
        g[torch.arange(targets.shape[0], device=g.device), targets] += grad
        dtype = ctx.compute_dtype
        gc = g.to(dtype)
        grad_h = (gc @ weight.to(dtype)).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (gc.t() @ hidden.to(dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b = g.sum(0).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_h, grad_w, grad_b, None


def _kept_head_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, transform=None) -> torch.Tensor:
    """A chunk whose logits stay for backward: the lean autograd function for a plain ``nn.Linear`` head
    (not partitioned by ZeRO-3, whose hooks must run) without a logit transform, else ordinary autograd."""
    if transform is None and type(head) is nn.Linear and not hasattr(head.weight, "ds_id"):
        return _LinearHeadLogps.apply(hidden, head.weight, head.bias, targets)
    return _head_logps(head, hidden, targets, transform)


def _chunked_head_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                        chunk: int, keep_mb: float = DEFAULT_KEEP_MB, transform=None) -> torch.Tensor:
    parts, kept = [], 0.0
    vocab = None
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            if vocab is None:
                vocab = head.out_features if hasattr(head, "out_features") else head.weight.shape[0]
            cost = h.shape[0] * vocab * 4 / 2**20  # the fp32 logits autograd keeps for this chunk
            if kept + cost <= keep_mb:
                kept += cost
                parts.append(_kept_head_logps(head, h, t, transform))
            else:
                parts.append(checkpoint(_kept_head_logps, head, h, t, transform, use_reentrant=False))
        else:
            parts.append(_head_logps(head, h, t, transform))
    if not parts:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(parts)


@torch.no_grad()
def _chunked_log_sum_sq(head: nn.Module, hidden: torch.Tensor, chunk: int, transform=None) -> torch.Tensor:
    """WPO's per-position statistic ``logsumexp(2 * log_softmax(logits))`` (no gradient), chunk by chunk."""
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        logits = head(hidden[start:start + chunk].detach()).float()
        if transform is not None:
            logits = transform(logits)
        parts.append(torch.logsumexp(2 * logits, dim=-1) - 2 * torch.logsumexp(logits, dim=-1))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def _scatter(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, shape) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.float32, device=values.device)
    return out.index_put((rows, cols), values)


def _forward_kwargs(position_ids: torch.Tensor | None, router_logits: bool) -> dict:
    extra: dict = {"output_router_logits": True} if router_logits else {}
    if position_ids is not None:
        extra["position_ids"] = position_ids
    return extra


def trained_positions(mask: torch.Tensor) -> torch.Tensor:
    """``[2, N]`` long: (row, column) of every position ``t`` whose NEXT token is trained (``mask[:, 1:]``).

    Computed on the host from a CPU mask (numpy, no device work); the collator passes it along with the batch
    so that the forward never asks the device how many positions there are (a host-device sync)."""
    import numpy as np

    rows, cols = np.nonzero(mask[:, 1:].numpy())
    return torch.from_numpy(np.stack([rows, cols]).astype(np.int64))


def selected_token_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         mask: torch.Tensor, *, chunk: int = DEFAULT_CHUNK, router_logits: bool = False,
                         position_ids: torch.Tensor | None = None, keep_mb: float = DEFAULT_KEEP_MB,
                         positions: torch.Tensor | None = None, log_sum_sq: bool = False):
    """``[B, T]`` fp32: log p(ids[b, t] | ids[b, :t]) where ``mask[b, t]``, else 0 (fast path).

    With ``router_logits`` (MoE models) returns ``(logps, router_logits)``. ``attention_mask=None`` with
    ``position_ids`` restarting at 0 is a packed row (see :mod:`dpocache.stages.train.packing`). ``positions``:
    the :func:`trained_positions` of ``mask`` when the caller has them (else found on the device).
    ``log_sum_sq``: also return WPO's per-token ``logsumexp(2 * log_softmax(logits))`` ``[B, T]`` (no gradient):
    the result is then ``(logps, router_logits or None, log_sum_sq)``.
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                  **_forward_kwargs(position_ids, router_logits))
    hidden = out[0]
    if positions is not None:
        rows, cols = positions[0], positions[1]
    else:
        rows, cols = torch.nonzero(mask[:, 1:], as_tuple=True)
    transform = logit_transform(getattr(model, "config", None))
    picked = hidden[rows, cols]
    values = _chunked_head_logps(head, picked, input_ids[rows, cols + 1], chunk, keep_mb, transform)
    logps = _scatter(values, rows, cols + 1, input_ids.shape)
    if log_sum_sq:
        stat = _scatter(_chunked_log_sum_sq(head, picked, chunk, transform), rows, cols + 1, input_ids.shape)
        return logps, out.router_logits if router_logits else None, stat
    return (logps, out.router_logits) if router_logits else logps


def full_token_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     mask: torch.Tensor, *, router_logits: bool = False, position_ids: torch.Tensor | None = None,
                     log_sum_sq: bool = False):
    """Reference implementation through the model's own forward (full logits); ``log_sum_sq`` as for
    :func:`selected_token_logps`."""
    result = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                   **_forward_kwargs(position_ids, router_logits))
    logits = result.logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=logits.device)
    out[:, 1:] = picked * mask[:, 1:].to(picked.dtype)
    if log_sum_sq:
        stat = torch.zeros_like(out)
        with torch.no_grad():
            stat[:, 1:] = torch.logsumexp(2 * logp.detach(), dim=-1) * mask[:, 1:].to(stat.dtype)
        return out, result.router_logits if router_logits else None, stat
    return (out, result.router_logits) if router_logits else out


def probe_tolerance(dtype: torch.dtype) -> float:
    """Largest per-token log-prob gap (nats) two exact computations may show in ``dtype``: rounding, not a
    different function. 16-bit matmuls round logits to ~3 significant digits."""
    return {torch.bfloat16: 0.1, torch.float16: 0.05}.get(dtype, 1e-4)


def _probe_ids(model: nn.Module):
    device = next(model.parameters()).device
    weight = model.get_output_embeddings().weight
    vocab = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 partitions keep the full shape in ds_shape
    ids = torch.arange(3, 11, device=device)[None] % vocab
    attn, mask = torch.ones_like(ids), torch.ones_like(ids)
    mask[:, 0] = 0
    return ids, attn, mask


def _has_decoder(model: nn.Module) -> bool:
    if model.get_output_embeddings() is None:
        return False
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):
        return False
    return decoder is not None and decoder is not model


def supports_selected_path(model: nn.Module, *, atol: float | None = None) -> bool:
    """Probe: does the selected-positions path reproduce the model's own logits (called on the bare model)?"""
    if not _has_decoder(model):
        return False
    ids, attn, mask = _probe_ids(model)
    atol = probe_tolerance(model.get_output_embeddings().weight.dtype) if atol is None else atol
    with torch.no_grad():
        try:
            fast = selected_token_logps(model, ids, attn, mask)
        except (TypeError, AttributeError, RuntimeError):
            return False
        ref = full_token_logps(model, ids, attn, mask)
    return bool((fast - ref).abs().max() <= atol)


def selected_path_gap(logp_model: nn.Module, inner: "TokenLogps") -> float | None:
    """Largest per-token |selected - full| gap of ``logp_model`` (a prepared wrapper of ``inner``: DDP, FSDP,
    DeepSpeed, or ``inner`` itself) on a short probe input, run through the wrapper so that sharded
    parameters are gathered and the training autocast applies; None when the selected path cannot run."""
    if not _has_decoder(inner.model):
        return None
    ids, attn, mask = _probe_ids(inner.model)
    was_selected, was_training = inner.selected, logp_model.training
    logp_model.eval()
    try:
        with torch.no_grad():
            inner.selected = False
            ref = logp_model(ids, attn, mask)
            inner.selected = True
            try:
                fast = logp_model(ids, attn, mask)
            except (TypeError, AttributeError, RuntimeError):
                return None
    finally:
        inner.selected = was_selected
        logp_model.train(was_training)
    ref, fast = (x[0] if isinstance(x, tuple) else x for x in (ref, fast))
    return float((fast.float() - ref.float()).abs().max())


class TokenLogps(nn.Module):
    """Wraps a causal LM so that its forward returns per-token log-probs of the labels.

    Distributed wrappers (DDP, DeepSpeed, FSDP) wrap this module, so the log-prob computation runs
    inside the wrapper's forward and gradient synchronisation works as usual.
    """

    @property
    def _no_split_modules(self):  # FSDP wraps the inner model's decoder layers
        return getattr(self.model, "_no_split_modules", None)

    def __init__(self, model: nn.Module, *, selected: bool | None = None, chunk: int = DEFAULT_CHUNK,
                 keep_mb: float = DEFAULT_KEEP_MB, load_balancing: bool = False, log_sum_sq: bool = False):
        super().__init__()
        self.model = model
        self.selected = supports_selected_path(model) if selected is None else selected
        self.chunk = chunk
        self.keep_mb = keep_mb
        self.load_balancing = load_balancing
        self.log_sum_sq = log_sum_sq

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None):
        """Per-token log-probs ``[B, T]``. With ``load_balancing`` (MoE) or ``log_sum_sq`` (WPO weights) a tuple
        ``(logps, router aux loss or None, per-token logsumexp(2 log p) or None)``.

        A packed row (:mod:`dpocache.stages.train.packing`) passes ``attention_mask=None`` and its
        ``position_ids``; ``positions`` are the host-computed :func:`trained_positions` of ``mask`` (optional).
        """
        extra = {"router_logits": self.load_balancing, "position_ids": position_ids, "log_sum_sq": self.log_sum_sq}
        if self.selected:
            out = selected_token_logps(self.model, input_ids, attention_mask, mask, chunk=self.chunk,
                                       keep_mb=self.keep_mb, positions=positions, **extra)
        else:
            out = full_token_logps(self.model, input_ids, attention_mask, mask, **extra)
        if not (self.load_balancing or self.log_sum_sq):
            return out
        logps, router, stat = out if self.log_sum_sq else (*out, None)
        aux = router_aux_loss(self.model.config, router, attention_mask) if self.load_balancing else None
        return logps, aux, stat


def router_aux_loss(config, router_logits, attention_mask: torch.Tensor) -> torch.Tensor:
    """The MoE load-balancing loss (Switch Transformer), as transformers computes it for the model."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    top_k = getattr(config, "num_experts_per_tok", 2)
    if experts is None or router_logits is None:
        raise ValueError("--load_balancing_loss needs a mixture-of-experts model (no router logits)")
    return load_balancing_loss_func(router_logits, experts, top_k, attention_mask)


def pad_batch(sequences: list, masks: list, pad_id: int, *, device=None):
    """Right-pad id and mask lists into ``input_ids``, ``attention_mask`` and trainable ``mask``."""
    width = max(len(s) for s in sequences)
    n = len(sequences)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    tmask = torch.zeros((n, width), dtype=torch.long)
    for i, (seq, m) in enumerate(zip(sequences, masks)):
        k = len(seq)
        ids[i, :k] = torch.as_tensor(seq, dtype=torch.long)
        attn[i, :k] = 1
        tmask[i, :k] = torch.as_tensor(m, dtype=torch.long)
    if device is not None:
        ids, attn, tmask = ids.to(device), attn.to(device), tmask.to(device)
    return ids, attn, tmask
