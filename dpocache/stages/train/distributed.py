"""Stage two under accelerate: one process, DDP, DeepSpeed ZeRO (1/2/3) or FSDP2, chosen by the launcher.

``accelerate launch`` decides the engine (``--multi_gpu``, ``--use_deepspeed``, ``--use_fsdp --fsdp_version 2``
or a config file from ``scripts/configs/``); this module builds the matching :class:`accelerate.Accelerator`,
fills the DeepSpeed values that depend on the run (micro-batch size, accumulation, clipping: stage two
prepares no dataloader, so accelerate cannot resolve ``"auto"`` itself), and gathers full weights for saving
(ZeRO-3 and FSDP keep each parameter partitioned across ranks).
"""

from __future__ import annotations

import os

import torch

from dpocache.config import ConfigError
from dpocache.stages.train.config import TrainConfig


def deepspeed_requested() -> bool:
    """Did the launcher ask for DeepSpeed (``accelerate launch --use_deepspeed`` or a DeepSpeed config)?"""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def make_accelerator(cfg: TrainConfig, *, cpu: bool | None = None):
    """The run's Accelerator. ``cpu`` (default: no CUDA on this machine): plain, DDP and FSDP runs use the CPU
    (gloo); DeepSpeed picks its own CPU accelerator (passing ``cpu=True`` would silently turn DeepSpeed off)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # a fresh configuration for each run in this process (the distributed process group itself is kept)
    AcceleratorState._reset_state()
    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    deepspeed = deepspeed_requested()
    if deepspeed:
        try:
            import deepspeed as _  # noqa: F401
        except ImportError:
            raise ConfigError("the launcher asked for DeepSpeed but it is not installed: pip install deepspeed "
                              "(on CPU-only machines: DS_BUILD_OPS=0 pip install deepspeed)") from None
        if cpu:
            # accelerate only sets up DeepSpeed's process group for accelerator devices; on a CPU-only machine
            # the gloo group is created first (as for a multi-CPU run) and DeepSpeed reuses it.
            from accelerate import PartialState

            PartialState(cpu=True)
    kwargs = {}
    if cfg.bf16:
        kwargs["mixed_precision"] = "bf16"
    if fsdp_requested():
        kwargs["fsdp_plugin"] = fsdp_plugin()
        if cpu:
            from accelerate import PartialState

            PartialState(cpu=True)  # the gloo group, as for DeepSpeed on CPU
    acc = Accelerator(cpu=cpu and not deepspeed and not fsdp_requested(),  # cpu=True would turn them off
                      gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                      log_with=cfg.report_to if cfg.with_tracking else None, project_dir=cfg.output_dir, **kwargs)
    if fsdp_requested() and cpu and acc.num_processes > 1:
        _fsdp_on_cpu(acc, kwargs["fsdp_plugin"])
    return acc


def _fsdp_on_cpu(acc, plugin) -> None:
    """accelerate enables FSDP for accelerator devices only; PyTorch's fully_shard also runs on CPU processes
    (gloo), which is how the FSDP2 path is exercised on machines without GPUs: mark the state as FSDP."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    if acc.state.mixed_precision != "no":
        plugin.set_mixed_precision(acc.state.mixed_precision)
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate does on GPUs


def fsdp_plugin():
    """FSDP2 from the launcher's settings (``FSDP_*`` variables set by ``accelerate launch``); where it sets none:
    each decoder layer (the model's ``_no_split_modules``) and the root sharded, full weights loaded on every
    rank, full state dicts for saving (dpocache gathers them itself)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    version = int(os.environ.get("FSDP_VERSION", "2"))
    if version != 2:
        raise ConfigError(f"FSDP version {version}: dpocache supports FSDP2 (PyTorch's fully_shard); launch with "
                          "--fsdp_version 2 (scripts/configs/accelerate_fsdp2.yaml)")
    defaults = {"FSDP_AUTO_WRAP_POLICY": ("auto_wrap_policy", "transformer_based_wrap"),
                "FSDP_STATE_DICT_TYPE": ("state_dict_type", "FULL_STATE_DICT"),
                "FSDP_CPU_RAM_EFFICIENT_LOADING": ("cpu_ram_efficient_loading", False)}
    kwargs = {field: value for env, (field, value) in defaults.items() if env not in os.environ}
    return FullyShardedDataParallelPlugin(fsdp_version=2, **kwargs)


def is_fsdp(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def sharded_optimizer(acc) -> bool:
    """Does each rank hold only its part of the optimizer state (ZeRO, FSDP)?"""
    return is_deepspeed(acc) or is_fsdp(acc)


def is_deepspeed(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.DEEPSPEED


def zero_stage(acc) -> int | None:
    plugin = acc.state.deepspeed_plugin
    return None if plugin is None else int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def engine_name(acc) -> str:
    """``single``, ``ddp`` or ``deepspeed-zeroN``: part of the settings a resumed run must share."""
    if is_deepspeed(acc):
        return f"deepspeed-zero{zero_stage(acc)}"
    if is_fsdp(acc):
        return "fsdp2"
    return "ddp" if acc.num_processes > 1 else "single"


def _fill(ds: dict, key: str, value, source: str) -> None:
    """Set ``key`` when it is ``auto`` or absent; a fixed, different value in the config file is an error."""
    current = ds.get(key, "auto")
    if current == "auto":
        ds[key] = value
    elif current != value:
        raise ConfigError(f"DeepSpeed config: {key} is {current} but {source} gives {value}; set it to \"auto\" "
                          "(dpocache fills it from its own options)")


def configure_deepspeed(acc, cfg: TrainConfig, model_config) -> None:
    """Fill the DeepSpeed config from stage two's options and the model's size before ``prepare``.

    dpocache builds its own AdamW and learning-rate schedule, so a DeepSpeed config must not define an
    ``optimizer`` or ``scheduler`` section (they would silently replace them).
    """
    ds = acc.state.deepspeed_plugin.deepspeed_config
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"DeepSpeed config: remove the '{section}' section; dpocache builds AdamW and the "
                              "--lr_scheduler_type schedule itself (--learning_rate, --weight_decay, ...)")
    world = acc.num_processes
    _fill(ds, "train_micro_batch_size_per_gpu", cfg.per_device_train_batch_size, "--per_device_train_batch_size")
    _fill(ds, "gradient_accumulation_steps", cfg.gradient_accumulation_steps, "--gradient_accumulation_steps")
    _fill(ds, "train_batch_size", cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world,
          "per_device_train_batch_size x gradient_accumulation_steps x processes")
    # DeepSpeed clips inside its step; 0 means no clipping (accelerate's own 'auto' default would be 1.0).
    _fill(ds, "gradient_clipping", float(cfg.max_grad_norm or 0.0), "--max_grad_norm")
    # the bucket sizes accelerate derives from the hidden size (it cannot see the model inside the wrapper)
    hidden = getattr(model_config, "hidden_size", None) or max(getattr(model_config, "hidden_sizes", [0]) or [0])
    zero = ds.setdefault("zero_optimization", {})
    sizes = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
             "stage3_param_persistence_threshold": 10 * hidden}
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            if not hidden:
                raise ConfigError(f"DeepSpeed config: zero_optimization.{key} is \"auto\" but the model config has "
                                  "no hidden_size; give an integer")
            zero[key] = value


def full_state_dict(acc, logp_model) -> dict[str, torch.Tensor]:
    """The policy's full state dict, gathered from every rank under ZeRO-3 (a collective: call on all ranks).

    Keys are the inner model's own (the ``TokenLogps`` wrapper's ``model.`` prefix is removed).
    """
    model = acc.unwrap_model(logp_model)
    if is_fsdp(acc):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        state = state if acc.is_main_process else {}
    elif zero_stage(acc) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    else:
        state = model.state_dict()
    prefix = "model."
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in (state or {}).items()}
