"""The ``dpocache`` command.

Sub-commands: ``score`` (stage one), ``train`` (stage two), ``run`` (both, reusing the store),
``data`` (validate and summarise a dataset), ``inspect`` (a store), ``store merge``, ``plot``.
Every option comes from a config dataclass field (see ``dpocache.config``); ``--config FILE.yaml``
sets any of them, flags on the command line win. One YAML file serves ``score``, ``train``, ``run``
and ``data``: each takes the keys it uses and names the others once, in a note.

Other trainers' spellings (TRL, open-instruct) are accepted as aliases (:data:`ALIASES`); their options
that mean nothing here are refused with the reason (:data:`UNSUPPORTED`). Usage errors (no command, an
unknown command or option, with a "did you mean" suggestion) print the sub-command's usage and exit 2;
prefixes of option names are not accepted. Known errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from dpocache import __version__
from dpocache.config import Alias, ConfigError, add_fields_to_parser, build, command_values, suggest, to_dict
from dpocache.console import final_line, log, quiet_libraries
from dpocache.preemption import PREEMPTED_EXIT_CODE, Preempted


def _classes(command: str) -> list[type]:
    from dpocache.data import DataConfig
    from dpocache.losses import LossConfig
    from dpocache.modeling import ModelConfig
    from dpocache.pipeline import RunConfig
    from dpocache.stages.score import ScoreConfig
    from dpocache.stages.train import TrainConfig
    from dpocache.stages.vllm_backend import VLLMOptions

    return {
        "score": [ModelConfig, DataConfig, ScoreConfig, VLLMOptions],
        "train": [ModelConfig, DataConfig, TrainConfig, LossConfig],
        "run": [ModelConfig, DataConfig, ScoreConfig, VLLMOptions, TrainConfig, LossConfig, RunConfig],
        "data": [DataConfig],
    }[command]


DESCRIPTIONS = {
    "score": "Stage one: score a preference dataset with a frozen reference model into a reference store.",
    "train": "Stage two: train the policy from a reference store (only the policy model is loaded); "
             "reference-free losses (simpo) can also train from --dataset/--mixer_list directly.",
    "run": "Both stages: score what the store lacks, train, evaluate on held-out pairs, summarise. "
           "With no arguments: the embedded SmolLM2-135M-Instruct and preference dataset.",
    "data": "Validate and summarise a dataset or mixture without any model.",
}


def _no_limit(value):
    """TRL / open-instruct write -1 for "no limit"; ours is null."""
    return None if str(value).strip() == "-1" else value


def _whole(value):
    """TRL's epochs are floats (3.0); ours are whole epochs."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    return int(number) if number.is_integer() else value


def _mixer_dict(value):
    """open-instruct's ``dataset_mixer`` ({source: amount}, or its JSON text) as a mixer list."""
    if isinstance(value, list) and len(value) == 1 and str(value[0]).lstrip().startswith("{"):
        value = value[0]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ConfigError(f"dataset_mixer: expected a mapping of source to amount, got {value!r}") from None
    if not isinstance(value, dict):
        return value
    return [str(x) for pair in value.items() for x in pair]


# Other trainers' option names -> dpocache's. Kept to options with the same meaning (README: "Coming from
# TRL / open-instruct" shows this table).
ALIASES: dict[str, Alias] = {
    "dataset_mixer_list": Alias("mixer_list", "open-instruct"),
    "dataset_mixer_list_splits": Alias("mixer_list_splits", "open-instruct"),
    "dataset_mixer": Alias("mixer_list", "open-instruct", _mixer_dict),
    "dataset_name": Alias("dataset", "TRL, open-instruct"),
    "dataset_train_split": Alias("mixer_list_splits", "TRL"),
    "tokenizer_name": Alias("tokenizer_name_or_path", "open-instruct"),
    "max_length": Alias("max_seq_length", "TRL"),
    "num_train_epochs": Alias("num_epochs", "TRL, open-instruct", _whole),
    "max_steps": Alias("max_train_steps", "TRL", _no_limit),
    "dpo_beta": Alias("beta", "open-instruct"),
    "dpo_loss_type": Alias("loss_type", "open-instruct"),
    "dpo_gamma_beta_ratio": Alias("gamma_beta_ratio", "open-instruct"),
    "dpo_label_smoothing": Alias("label_smoothing", "open-instruct"),
    "clip_grad_norm": Alias("max_grad_norm", "open-instruct", _no_limit),
    "save_steps": Alias("checkpointing_steps", "TRL"),
    "save_total_limit": Alias("keep_last_n_checkpoints", "TRL"),
    "use_peft": Alias("use_lora", "TRL"),
    "lora_r": Alias("lora_rank", "TRL"),
    "padding_free": Alias("packing", "TRL"),
    "torch_dtype": Alias("dtype", "TRL"),
    "precompute_ref_batch_size": Alias("batch_size", "TRL"),
    "per_device_eval_batch_size": Alias("eval_batch_size", "TRL"),
    "exp_name": Alias("run_name", "open-instruct"),
    "hub_model_id": Alias("hf_repo_id", "TRL"),
    "hub_revision": Alias("hf_repo_revision", "TRL"),
    "hub_private_repo": Alias("hf_private", "TRL"),
}

_WHOLE_SEQUENCE = ("dpocache never truncates prompts or completions separately: --max_seq_length right-truncates "
                   "each whole sequence (chosen and rejected), as open-instruct does")
_EVAL = "the held-out evaluation runs once, after training, in `dpocache run --heldout_dataset FILE`"

# Other trainers' options that have no meaning here, with the reason (and what to use instead).
UNSUPPORTED: dict[str, str] = {
    "precompute_ref_log_probs": "dpocache always precomputes the reference: `dpocache score` writes its log-probs "
                                "to the store and `train` reads them (`run` does both); no flag is needed",
    "max_prompt_length": _WHOLE_SEQUENCE,
    "max_completion_length": _WHOLE_SEQUENCE,
    "truncation_mode": _WHOLE_SEQUENCE,
    "reference_free": "the dpo losses read the stored reference; for a loss without one use --loss_type simpo",
    "sync_ref_model": "the reference is frozen and scored once into the store (its weights are part of the "
                      "store's identity), so it cannot be synchronised with the policy",
    "rpo_alpha": "not mapped; the closest option is --sft_weight (an added chosen NLL term per token)",
    "warmup_steps": "use --warmup_ratio (the fraction of optimizer steps with linear warm-up)",
    "eval_strategy": _EVAL,
    "eval_steps": _EVAL,
    "do_eval": _EVAL,
    "save_strategy": "checkpoints are written every --checkpointing_steps steps (and, with "
                     "--checkpoint_at_epoch_end, at the end of each epoch)",
    "use_flash_attn": "use --attn_implementation flash_attention_2",
    "use_qlora": "quantized (QLoRA) training is not supported; --use_lora trains LoRA adapters",
    "load_in_4bit": "quantized (QLoRA) training is not supported; --use_lora trains LoRA adapters",
    "load_in_8bit": "quantized training is not supported; --use_lora trains LoRA adapters",
    "model_init_kwargs": "use --dtype, --attn_implementation, --trust_remote_code and --model_revision",
    "use_logits_to_keep": "--fused_logps (on by default) applies the output head only where a trainable token is "
                          "predicted",
    "hf_entity": "give the namespace in --hf_repo_id ORG/NAME",
}

YAML_COMMANDS = tuple(DESCRIPTIONS)


def _owners() -> dict[str, list[str]]:
    """Every option of every command that takes options -> the commands that use it."""
    from dpocache.config import iter_fields

    owners: dict[str, list[str]] = {}
    for command in YAML_COMMANDS:
        for f, _ in iter_fields(_classes(command)):
            owners.setdefault(f.name, []).append(command)
    return owners


class UsageError(Exception):
    """A command line argparse cannot take; ``parser`` is the (sub-)command whose usage applies."""

    def __init__(self, parser: argparse.ArgumentParser, message: str):
        super().__init__(message)
        self.parser, self.message = parser, message


class _Parser(argparse.ArgumentParser):
    """No prefix abbreviations; errors raise :class:`UsageError` (``main`` prints them and returns 2)."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)
        self.commands: dict[str, argparse.ArgumentParser] = {}

    def error(self, message: str):
        raise UsageError(self, _with_suggestion(self, message))


def _with_suggestion(parser: argparse.ArgumentParser, message: str) -> str:
    """argparse's "invalid choice: 'trian'" with the closest choice."""
    if "invalid choice:" not in message:
        return message
    given = message.split("invalid choice:", 1)[1].split("(", 1)[0].strip().strip("'")
    choices = [c for a in parser._actions if a.choices for c in a.choices]
    close = suggest(given, choices)
    return message + (f"; did you mean {close!r}?" if close else "")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dpocache", description="DPO training with persisted, content-addressed reference log-probs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dpocache {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.commands = sub.choices  # name -> sub-command parser, filled by add_parser
    for name, desc in DESCRIPTIONS.items():
        usage = f"dpocache {name} [--config YAML]{' [--dry_run]' if name != 'data' else ' [--json]'} " \
                f"[--OPTION VALUE ...]   (`dpocache {name} --help` lists every option)"
        p = sub.add_parser(name, help=desc, description=desc, usage=usage)
        p.add_argument("--config", metavar="YAML", help="YAML file of options (flags given here win); keys "
                       "that only other commands use are named in a note and ignored")
        if name in ("score", "train", "run"):
            p.add_argument("--dry_run", "--dry-run", action="store_true",
                           help="print the resolved configuration as YAML and exit (nothing is loaded)")
        if name == "data":
            p.add_argument("--json", action="store_true", dest="json_output",
                           help="print the summary as one JSON object")
        add_fields_to_parser(p, _classes(name), aliases=ALIASES)
    p = sub.add_parser("inspect", help="Describe (and verify) a reference store.",
                       description="The reference that scored a store (model, dtype, backend, dates, library "
                                   "versions), then its identity, shards, rows, bytes, named lists and statistics.")
    p.add_argument("store", help="store directory")
    p.add_argument("--verify", action="store_true",
                   help="check every checksum and every row (the checks training runs), naming each bad row")
    p.add_argument("--json", action="store_true", dest="json_output", help="print one JSON object")
    p.add_argument("--dataset", help="report how many examples of this dataset the store covers")
    p.add_argument("--tokenizer_name_or_path", "--tokenizer-name-or-path",
                   help="tokenizer for --dataset (default: the reference model the store's manifest records)")
    p = sub.add_parser("store", help="Store maintenance (merge).")
    store_sub = p.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    m = store_sub.add_parser("merge", help="Merge sub-stores scored in parallel into one store.")
    m.add_argument("dst", help="destination store (created when missing)")
    m.add_argument("sources", nargs="+", help="stores to merge (identities must match)")
    p = sub.add_parser("plot", help="Write PNG charts of a run's metrics.jsonl.")
    p.add_argument("output_dir", help="a training output directory holding metrics.jsonl")
    return parser


def _unknown_option(command: str, parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """The message for arguments a command does not take: another command's option, another trainer's
    option with no meaning here, or a misspelling (with the closest flag or alias of ``command``)."""
    token = next((t for t in extras if t.startswith("-")), None)
    if token is None:
        return f"unexpected argument {extras[0]!r}"
    name = token.split("=", 1)[0].lstrip("-").replace("-", "_")
    if name in UNSUPPORTED:
        return f"--{name}: {UNSUPPORTED[name]}"
    alias = ALIASES.get(name)
    target = alias.target if alias else name
    owners = _owners().get(target)
    if owners:
        what = f"--{name} (--{target} here)" if alias else f"--{name}"
        return f"{what} is an option of {', '.join(owners)}, not of {command}"
    flags = [s.lstrip("-").replace("-", "_") for s in parser._option_string_actions if s.startswith("--")]
    close = suggest(name, flags)
    return f"unrecognized option {token.split('=', 1)[0]}" + (f"; did you mean --{close}?" if close else "")


def _parse(parser: _Parser, argv: list[str] | None) -> argparse.Namespace:
    args, extras = parser.parse_known_args(argv)
    if not args.command:
        raise UsageError(parser, f"no command given (one of: {', '.join(parser.commands)})"
                         + (f"; unrecognized {' '.join(extras)}" if extras else ""))
    if extras:
        sub = parser.commands[args.command]
        raise UsageError(sub, _unknown_option(args.command, sub, extras))
    return args


def _configs(args: argparse.Namespace) -> list:
    classes = _classes(args.command)
    owners = _owners()
    values, ignored = command_values(args, classes, aliases=ALIASES, owners=owners, unsupported=UNSUPPORTED)
    if ignored:
        targets = [ALIASES[k].target if k in ALIASES else k for k in ignored]
        users = sorted({c for key in targets for c in owners[key]}, key=YAML_COMMANDS.index)
        note = (f"note: {args.command} does not use {', '.join(ignored)} from {args.config} "
                f"(option(s) of {', '.join(users)})")
        if getattr(args, "dry_run", False):
            print(f"# {note}")  # the dry run's output stays valid YAML
        elif not getattr(args, "json_output", False):  # the JSON summary stays one JSON object
            log(note)
    return build(classes, values, source=args.config or "command line")


def _dry_run(args, configs) -> bool:
    if not getattr(args, "dry_run", False):
        return False
    import yaml

    print(f"# dpocache {args.command}: resolved configuration")
    print(yaml.safe_dump(to_dict(*configs), sort_keys=False), end="")
    return True


def _cmd_score(args) -> int:
    from dpocache.stages.score import run_score

    configs = _configs(args)
    if _dry_run(args, configs):
        return 0
    model_cfg, data_cfg, score_cfg, vllm_opts = configs
    result = run_score(model_cfg, data_cfg, score_cfg, vllm_opts)
    added = f", {result.completed} given per-token values" if result.completed else ""
    part = f"; {result.part}: {result.part_examples} examples" if result.part else ""
    print(f"stage one: store {result.store}, list '{result.list_name}': {result.examples} examples "
          f"({result.scored} scored, {result.reused} reused{added}{part}) in {result.seconds:.1f} s")
    return 0


def _cmd_train(args) -> int:
    from dpocache.stages.train import run_train

    configs = _configs(args)
    if _dry_run(args, configs):
        return 0
    model_cfg, data_cfg, train_cfg, loss_cfg = configs
    run_train(model_cfg, train_cfg, data_cfg=data_cfg, loss_cfg=loss_cfg)
    _destroy_process_group()
    return 0


def _cmd_run(args) -> int:
    from dpocache.pipeline import run

    configs = _configs(args)
    if _dry_run(args, configs):
        return 0
    model_cfg, data_cfg, score_cfg, vllm_opts, train_cfg, loss_cfg, run_cfg = configs
    run(model_cfg, data_cfg, score_cfg, train_cfg, run_cfg, vllm_opts, loss_cfg=loss_cfg)
    _destroy_process_group()
    return 0


def _cmd_data(args) -> int:
    from dpocache.data.report import format_summary, summarize

    (data_cfg,) = _configs(args)
    summary = summarize(data_cfg)
    print(json.dumps(summary) if args.json_output else format_summary(summary))
    return 0


def _cmd_inspect(args) -> int:
    from dpocache.artifacts import format_inspect, inspect_store

    hashes = _dataset_hashes(args) if args.dataset else None
    report = inspect_store(args.store, verify=args.verify, dataset_hashes=hashes)
    print(json.dumps(report, default=str) if args.json_output else format_inspect(report))
    return 0 if report.get("ok", True) else 1


def _dataset_hashes(args) -> list[str]:
    """Tokenize --dataset exactly as the store's reference identity says, and return its example list."""
    from dpocache.artifacts import ReferenceStore
    from dpocache.artifacts.identity import tokenizer_fingerprint
    from dpocache.data import DataConfig, load_preference_data
    from dpocache.modeling import load_tokenizer

    store = ReferenceStore.open(args.store, verify=False)
    ident, info = store.identity, store.versions
    name, revision = _inspect_tokenizer(args, info)
    cfg = DataConfig(dataset=args.dataset, max_seq_length=ident.get("max_seq_length"),
                     mask_mode=ident.get("mask_mode", "all_assistant"), add_bos=bool(ident.get("add_bos")))
    tok = load_tokenizer(name, revision=revision)
    if info.get("chat_template"):
        tok.chat_template = info["chat_template"]
    if info.get("pad_token") and tok.pad_token != info["pad_token"]:
        tok.add_special_tokens({"pad_token": info["pad_token"]})
    expected = ident.get("tokenizer_sha256")
    if expected is not None and tokenizer_fingerprint(tok) != expected:
        raise ConfigError(f"inspect --dataset: the tokenizer {name} differs from the one {args.store} was scored "
                          f"with (tokenizer_sha256 {tokenizer_fingerprint(tok)[:12]} != {expected[:12]}); pass the "
                          "reference model's tokenizer with --tokenizer_name_or_path")
    return load_preference_data(cfg, tok, progress=False).hashes


def _inspect_tokenizer(args, info: dict) -> tuple[str, str | None]:
    """(tokenizer, revision) for inspect --dataset: --tokenizer_name_or_path, else the one the manifest records."""
    from dpocache.modeling import local_model_dir

    if args.tokenizer_name_or_path:
        return args.tokenizer_name_or_path, None
    name = info.get("tokenizer_name") or info.get("model_name")
    revision = info.get("model_revision")
    if not name:
        raise ConfigError(f"inspect --dataset: the manifest of {args.store} records no reference model; pass "
                          "--tokenizer_name_or_path (the reference model's tokenizer)")
    local = local_model_dir(name, revision)
    if local is None:
        raise ConfigError(f"inspect --dataset: {args.store} was scored with '{name}'"
                          + (f" (revision {revision})" if revision else "") + ", which is not available on this "
                          "machine; pass --tokenizer_name_or_path (the reference model's tokenizer)")
    return str(local), None


def _cmd_store(args) -> int:
    from dpocache.artifacts import merge_stores

    result = merge_stores(args.dst, args.sources)
    print(json.dumps(result, indent=2, default=str))
    return 0


def _cmd_plot(args) -> int:
    from dpocache.plotting import plot_metrics

    for path in plot_metrics(args.output_dir):
        print(path)
    return 0


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _known_errors() -> tuple[type, ...]:
    from dpocache.artifacts import StoreError
    from dpocache.data import DataError
    from dpocache.files import DiskFullError
    from dpocache.hub import HubError
    from dpocache.modeling import ModelLoadError
    from dpocache.stages.train.guards import NonFiniteError

    return (ConfigError, DataError, StoreError, ModelLoadError, HubError, DiskFullError, NonFiniteError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = _parse(parser, argv)
    except UsageError as exc:
        exc.parser.print_usage(sys.stderr)
        final_line(f"{exc.parser.prog}: error: {exc.message}")
        return 2
    handler = globals()[f"_cmd_{args.command}"]
    quiet_libraries()
    try:
        return handler(args)
    except _known_errors() as exc:
        final_line(f"dpocache {args.command}: error: {exc}")
        return 2
    except Preempted as exc:
        final_line(f"dpocache {args.command}: preempted: {exc}")
        return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt:
        final_line(f"dpocache {args.command}: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
