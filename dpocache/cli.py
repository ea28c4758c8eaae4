"""The ``dpocache`` command.

Sub-commands: ``score`` (stage one), ``train`` (stage two), ``run`` (both, reusing the store),
``data`` (validate and summarise a dataset), ``inspect`` (a store), ``store merge``, ``plot``.
Every option comes from a config dataclass field (see ``dpocache.config``); ``--config FILE.yaml``
sets any of them, flags on the command line win.
"""

from __future__ import annotations

import argparse
import json
import sys

from dpocache.config import ConfigError, add_fields_to_parser, build, merged_values, to_dict
from dpocache.preemption import PREEMPTED_EXIT_CODE, Preempted


def _classes(command: str) -> list[type]:
    from dpocache.data import DataConfig
    from dpocache.modeling import ModelConfig
    from dpocache.pipeline import RunConfig
    from dpocache.stages.score import ScoreConfig
    from dpocache.stages.train import TrainConfig
    from dpocache.stages.vllm_backend import VLLMOptions

    return {
        "score": [ModelConfig, DataConfig, ScoreConfig, VLLMOptions],
        "train": [ModelConfig, DataConfig, TrainConfig],
        "run": [ModelConfig, DataConfig, ScoreConfig, VLLMOptions, TrainConfig, RunConfig],
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpocache", description="DPO training with persisted, content-addressed reference log-probs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, desc in DESCRIPTIONS.items():
        p = sub.add_parser(name, help=desc, description=desc)
        p.add_argument("--config", metavar="YAML", help="YAML file of options (flags given here win)")
        if name in ("score", "train", "run"):
            p.add_argument("--dry_run", "--dry-run", action="store_true",
                           help="print the resolved configuration as YAML and exit (nothing is loaded)")
        if name == "data":
            p.add_argument("--json", action="store_true", dest="json_output",
                           help="print the summary as one JSON object")
        add_fields_to_parser(p, _classes(name))
    p = sub.add_parser("inspect", help="Describe (and verify) a reference store.",
                       description="Identity, shards, rows, bytes, named lists and statistics of a store.")
    p.add_argument("store", help="store directory")
    p.add_argument("--verify", action="store_true", help="check every checksum and Parquet footer")
    p.add_argument("--json", action="store_true", dest="json_output", help="print one JSON object")
    p.add_argument("--dataset", help="report how many examples of this dataset the store covers")
    p.add_argument("--tokenizer_name_or_path", "--tokenizer-name-or-path",
                   help="tokenizer for --dataset (the reference model's)")
    p = sub.add_parser("store", help="Store maintenance (merge).")
    store_sub = p.add_subparsers(dest="store_command", metavar="ACTION")
    m = store_sub.add_parser("merge", help="Merge sub-stores scored in parallel into one store.")
    m.add_argument("dst", help="destination store (created when missing)")
    m.add_argument("sources", nargs="+", help="stores to merge (identities must match)")
    p = sub.add_parser("plot", help="Write PNG charts of a run's metrics.jsonl.")
    p.add_argument("output_dir", help="a training output directory holding metrics.jsonl")
    return parser


def _configs(args: argparse.Namespace) -> list:
    classes = _classes(args.command)
    values = merged_values(args, classes)
    values.pop("json_output", None)
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
    model_cfg, data_cfg, train_cfg = configs
    run_train(model_cfg, train_cfg, data_cfg=data_cfg)
    _destroy_process_group()
    return 0


def _cmd_run(args) -> int:
    from dpocache.pipeline import run

    configs = _configs(args)
    if _dry_run(args, configs):
        return 0
    model_cfg, data_cfg, score_cfg, vllm_opts, train_cfg, run_cfg = configs
    run(model_cfg, data_cfg, score_cfg, train_cfg, run_cfg, vllm_opts)
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
    from dpocache.data import DataConfig, load_preference_data
    from dpocache.modeling import load_tokenizer

    if not args.tokenizer_name_or_path:
        raise ConfigError("inspect --dataset needs --tokenizer_name_or_path (the reference model's tokenizer)")
    store = ReferenceStore.open(args.store, verify=False)
    ident, info = store.identity, store.versions
    cfg = DataConfig(dataset=args.dataset, max_seq_length=ident.get("max_seq_length"),
                     mask_mode=ident.get("mask_mode", "all_assistant"), add_bos=bool(ident.get("add_bos")))
    tok = load_tokenizer(args.tokenizer_name_or_path)
    if info.get("chat_template"):
        tok.chat_template = info["chat_template"]
    if info.get("pad_token") and tok.pad_token != info["pad_token"]:
        tok.add_special_tokens({"pad_token": info["pad_token"]})
    return load_preference_data(cfg, tok, progress=False).hashes


def _cmd_store(args) -> int:
    from dpocache.artifacts import merge_stores

    if args.store_command != "merge":
        raise ConfigError("usage: dpocache store merge DST SRC [SRC ...]")
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

    return (ConfigError, DataError, StoreError, ModelLoadError, HubError, DiskFullError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    handler = globals()[f"_cmd_{args.command}"]
    try:
        return handler(args)
    except _known_errors() as exc:
        print(f"dpocache {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Preempted as exc:
        print(f"dpocache {args.command}: preempted: {exc}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt:
        print(f"dpocache {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
