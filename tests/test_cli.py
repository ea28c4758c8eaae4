"""The command line as users meet it: one YAML for every command, TRL / open-instruct option names,
misspellings, finite floats, exit codes and usage (real files, the real `main`, real processes)."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import conversational_rows, write_jsonl

import dpocache
from dpocache.cli import ALIASES, UNSUPPORTED, _classes, _owners, main
from dpocache.config import _unwrap_optional, iter_fields
from dpocache.stages.train.tracking import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def dry_run(command, *args, capsys):
    """`dpocache COMMAND --dry_run ...`: (exit code, resolved options, the note comment lines)."""
    code = main([command, "--dry_run", *args])
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("# note:")]
    return code, (yaml.safe_load(out) if code == 0 else None), notes


def run_yaml(tmp_path, **extra) -> Path:
    """A run's YAML with options of every command (model, data, stage one, stage two, run)."""
    values = {"model_name_or_path": "path/to/sft", "dataset": "prefs.jsonl", "heldout_dataset": "held.jsonl",
              "store": "stores/ref", "batch_size": 4, "output_dir": str(tmp_path / "out"), "beta": 0.1,
              "loss_type": "dpo", "learning_rate": 5.0e-7, **extra}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


# ---- one YAML for every command ---------------------------------------------------------------------------

def test_one_yaml_serves_score_train_and_run(tmp_path, capsys):
    cfg = run_yaml(tmp_path)
    code, score, notes = dry_run("score", "--config", str(cfg), capsys=capsys)
    assert code == 0 and score["batch_size"] == 4 and score["store"] == "stores/ref" and "beta" not in score
    assert notes == [f"# note: score does not use heldout_dataset, output_dir, beta, loss_type, learning_rate "
                     f"from {cfg} (option(s) of train, run)"]
    code, train, notes = dry_run("train", "--config", str(cfg), capsys=capsys)
    assert code == 0 and train["beta"] == 0.1 and train["learning_rate"] == 5e-7 and train["store"] == "stores/ref"
    assert notes == [f"# note: train does not use heldout_dataset, batch_size from {cfg} (option(s) of score, run)"]
    code, run, notes = dry_run("run", "--config", str(cfg), capsys=capsys)
    assert code == 0 and notes == [] and run["heldout_dataset"] == "held.jsonl" and run["batch_size"] == 4


def test_data_takes_its_keys_and_notes_the_rest_once(tmp_path, capsys):
    data = write_jsonl(tmp_path / "prefs.jsonl", conversational_rows(5))
    cfg = run_yaml(tmp_path, dataset=str(data))
    assert main(["data", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "data does not use model_name_or_path, heldout_dataset, store, batch_size" in notes[0]
    assert "read 5, kept 5" in out
    assert main(["data", "--config", str(cfg), "--json"]) == 0  # --json: stdout stays one JSON object
    assert yaml.safe_load(capsys.readouterr().out)["sources"][0]["kept"] == 5


def test_a_shared_yaml_drives_real_score_and_train(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "prefs.jsonl", conversational_rows(8, seed=4))
    held = write_jsonl(tmp_path / "held.jsonl", conversational_rows(4, seed=9))
    cfg = run_yaml(tmp_path, model_name_or_path=str(tiny_model_dir), dataset=str(data), heldout_dataset=str(held),
                   store=str(tmp_path / "store"), store_dataset="prefs", max_train_steps=2,
                   per_device_train_batch_size=4, learning_rate=1e-3, checkpointing_steps=None)
    assert main(["score", "--config", str(cfg)]) == 0
    assert main(["train", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "note: score does not use heldout_dataset" in out and "note: train does not use heldout_dataset" in out
    assert len(read_jsonl(tmp_path / "out" / "metrics.jsonl")) == 2


@pytest.mark.parametrize("line,message", [
    ("learning_rat: 1.0e-6", "unknown option learning_rat (did you mean learning_rate?)"),
    ("num_train_epoch: 2", "unknown option num_train_epoch (did you mean num_train_epochs?)"),
    ("zzz_unheard_of: 1", "unknown option zzz_unheard_of"),
    ("precompute_ref_log_probs: true", "precompute_ref_log_probs: dpocache always precomputes the reference"),
])
@pytest.mark.parametrize("command", ["score", "train", "run", "data"])
def test_a_key_no_command_knows_is_an_error(command, line, message, tmp_path, capsys):
    cfg = run_yaml(tmp_path)
    cfg.write_text(cfg.read_text() + line + "\n")
    assert main([command, "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dpocache {command}: error: {cfg}: ") and message in err and "\n" not in err


# ---- option names users already type ----------------------------------------------------------------------

ALIAS_CASES = [  # (flag, values, option it sets, resolved value)
    ("dataset_mixer_list", ["a.jsonl", "0.5", "b.jsonl", "100"], "mixer_list", ["a.jsonl", "0.5", "b.jsonl", "100"]),
    ("dataset_mixer_list_splits", ["test"], "mixer_list_splits", ["test"]),
    ("num_train_epochs", ["3"], "num_epochs", 3),
    ("num_train_epochs", ["2.0"], "num_epochs", 2),  # TRL's epochs are floats
    ("max_length", ["512"], "max_seq_length", 512),
    ("max_steps", ["7"], "max_train_steps", 7),
    ("max_steps", ["-1"], "max_train_steps", None),  # TRL's "no limit"
    ("dpo_beta", ["0.1"], "beta", 0.1),
    ("dpo_loss_type", ["dpo"], "loss_type", "dpo"),
    ("save_steps", ["50"], "checkpointing_steps", 50),
    ("save_total_limit", ["2"], "keep_last_n_checkpoints", 2),
    ("use_peft", [], "use_lora", True),
    ("lora_r", ["8"], "lora_rank", 8),
    ("dataset_name", ["a.jsonl"], "dataset", "a.jsonl"),
    ("per_device_eval_batch_size", ["4"], "eval_batch_size", 4),
    ("tokenizer_name", ["tok"], "tokenizer_name_or_path", "tok"),
    ("padding_free", ["true"], "packing", True),
    ("precompute_ref_batch_size", ["16"], "batch_size", 16),
    ("torch_dtype", ["bfloat16"], "dtype", "bfloat16"),
]


@pytest.mark.parametrize("flag,values,option,expected", ALIAS_CASES)
def test_aliases_on_the_command_line(flag, values, option, expected, capsys):
    code, resolved, _ = dry_run("run", f"--{flag}", *values, capsys=capsys)
    assert code == 0 and resolved[option] == expected
    code, dashed, _ = dry_run("run", f"--{flag.replace('_', '-')}", *values, capsys=capsys)
    assert code == 0 and dashed[option] == expected


@pytest.mark.parametrize("flag,values,option,expected", ALIAS_CASES)
def test_aliases_in_yaml(flag, values, option, expected, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    value = values if option in ("mixer_list", "mixer_list_splits") else (values[0] if values else True)
    cfg.write_text(yaml.safe_dump({flag: value}))
    code, resolved, _ = dry_run("run", "--config", str(cfg), capsys=capsys)
    assert code == 0 and resolved[option] == expected


def test_the_alias_tables_match_the_options():
    owners = _owners()
    assert all(alias.target in owners for alias in ALIASES.values())  # every alias sets a real option
    assert not set(ALIASES) & set(owners) and not set(UNSUPPORTED) & set(owners)  # and shadows none
    assert not set(ALIASES) & set(UNSUPPORTED)


def test_open_instruct_dataset_mixer_mapping(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset_mixer:\n  a.jsonl: 1.0\n  b.jsonl: 500\n")
    code, resolved, _ = dry_run("run", "--config", str(cfg), capsys=capsys)
    assert code == 0 and resolved["mixer_list"] == ["a.jsonl", "1.0", "b.jsonl", "500"]


def test_an_alias_with_its_canonical_name_is_an_error(tmp_path, capsys):
    assert main(["train", "--num_train_epochs", "2", "--num_epochs", "3"]) == 2
    assert "--num_train_epochs and --num_epochs are the same option (--num_epochs)" in capsys.readouterr().err
    assert main(["train", "--dpo_beta", "0.1", "--beta=0.2"]) == 2
    assert "--dpo_beta and --beta are the same option" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_length: 512\nmax_seq_length: 1024\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert f"{cfg}: max_length and max_seq_length are the same option (max_seq_length)" in capsys.readouterr().err
    cfg.write_text("max_length: 512\n")  # across sources the command line wins, as for any option
    code, resolved, _ = dry_run("train", "--config", str(cfg), "--max_seq_length", "64", capsys=capsys)
    assert code == 0 and resolved["max_seq_length"] == 64


def test_help_names_the_aliases(capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "also --num_train_epochs (TRL, open-instruct)" in text and "also --dpo_beta (open-instruct)" in text


@pytest.mark.parametrize("flag,reason", [
    ("--precompute_ref_log_probs", "dpocache always precomputes the reference: `dpocache score` writes"),
    ("--max_prompt_length", "never truncates prompts or completions separately: --max_seq_length"),
    ("--warmup_steps", "use --warmup_ratio"),
])
def test_trl_options_without_meaning_here_say_why(flag, reason, capsys):
    assert main(["train", flag, "128"]) == 2
    err = capsys.readouterr().err
    assert f"dpocache train: error: {flag}: " in err and reason in err


@pytest.mark.parametrize("argv,expected", [
    (["train", "--learning_rat", "1e-6"], "unrecognized option --learning_rat; did you mean --learning_rate?"),
    (["train", "--learning_rat=1e-6"], "unrecognized option --learning_rat; did you mean --learning_rate?"),
    (["train", "--learning-rat", "1e-6"], "did you mean --learning_rate?"),
    (["train", "--num_train_epoch", "2"], "did you mean --num_train_epochs?"),  # aliases are candidates too
    (["run", "--heldout_datset", "h.jsonl"], "did you mean --heldout_dataset?"),
    (["score", "--bakend", "hf"], "did you mean --backend?"),
    (["data", "--mixer_lst", "a.jsonl", "1.0"], "did you mean --mixer_list?"),
    (["score", "--beta", "0.1"], "--beta is an option of train, run, not of score"),
    (["score", "--per_device_eval_batch_size", "4"],
     "--per_device_eval_batch_size (--eval_batch_size here) is an option of train, run, not of score"),
    (["train", "--learning_rate", "1e-6", "extra"], "unexpected argument 'extra'"),
])
def test_misspellings_get_a_suggestion_and_the_sub_command_usage(argv, expected, capsys):
    assert main(argv) == 2
    usage, error = capsys.readouterr().err.splitlines()
    assert usage.startswith(f"usage: dpocache {argv[0]} [--config YAML]") and "COMMAND" not in usage
    assert error.startswith(f"dpocache {argv[0]}: error: ") and expected in error


def test_prefixes_of_option_names_are_not_accepted(capsys):
    for argv in (["train", "--learning_rat", "1e-6"], ["train", "--bet", "0.1"], ["score", "--model", "m"]):
        assert main([*argv, "--dry_run"]) == 2, argv
    assert "unrecognized option --model" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"dpocache {version}" \
        and dpocache.__version__ == version


# ---- finite floats ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["inf", "-inf", "+INF", "Infinity", "nan", "NaN", "-nan", "1e999"])
def test_non_finite_values_are_refused_on_the_command_line(value, capsys):
    assert main(["train", f"--beta={value}", "--dry_run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"dpocache train: error: beta: expected a finite number, got '{value}'"
    assert main(["train", "--beta", value, "--dry_run"]) == 2  # (-inf as a separate word reads as an option)


@pytest.mark.parametrize("text", [".inf", "-.Inf", ".nan", "'nan'", "1e999"])
def test_non_finite_values_are_refused_in_yaml(text, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"learning_rate: {text}\n")
    assert main(["train", "--config", str(cfg), "--dry_run"]) == 2
    assert f"error: {cfg}: learning_rate: expected a finite number" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "--learning_rate", "1e-5", "--dry_run"]) == 0  # the command line wins


@pytest.mark.parametrize("command", ["score", "train", "run", "data"])
def test_every_float_option_must_be_finite(command, capsys):
    floats = [f.name for f, tp in iter_fields(_classes(command)) if _unwrap_optional(tp)[0] is float]
    if command in ("train", "run"):
        assert {"beta", "learning_rate", "max_grad_norm", "label_smoothing", "lora_alpha"} <= set(floats)
    for name in floats:
        for value in ("nan", "inf"):
            assert main([command, f"--{name}", value, "--dry_run" if command != "data" else "--json"]) == 2
            assert f"error: {name}: expected a finite number" in capsys.readouterr().err, name


def test_float_options_keep_finite_values(capsys):
    code, resolved, _ = dry_run("train", "--beta", "1e-3", "--max_grad_norm", "1.0", capsys=capsys)
    assert code == 0 and resolved["beta"] == 1e-3 and resolved["max_grad_norm"] == 1.0


# ---- exit codes and usage ---------------------------------------------------------------------------------

def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpocache.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_exit_codes_and_usage_of_a_real_process(tmp_path):
    none = cli()
    assert none.returncode == 2 and none.stdout == ""
    assert none.stderr.splitlines() == ["usage: dpocache [-h] [--version] COMMAND ...",
                                        "dpocache: error: no command given (one of: score, train, run, data, "
                                        "inspect, store, plot)"]
    unknown = cli("trian", "--beta", "1")
    assert unknown.returncode == 2 and unknown.stderr.startswith("usage: dpocache [-h] [--version] COMMAND")
    assert "invalid choice: 'trian'" in unknown.stderr and "did you mean 'train'?" in unknown.stderr
    typo = cli("train", "--learning_rat", "1e-6")
    assert typo.returncode == 2 and typo.stderr.splitlines()[0].startswith("usage: dpocache train ")
    assert typo.stderr.splitlines()[1] == "dpocache train: error: unrecognized option --learning_rat; did you " \
                                          "mean --learning_rate?"
    bad = cli("train", "--store", str(tmp_path / "missing"), "--model_name_or_path", "m", "--beta", "nan")
    assert bad.returncode == 2 and bad.stderr.strip() == "dpocache train: error: beta: expected a finite number, " \
                                                         "got 'nan'"
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"dpocache {dpocache.__version__}"


@pytest.mark.parametrize("argv,usage,message", [
    (["store"], "usage: dpocache store [-h] ACTION ...", "the following arguments are required: ACTION"),
    (["store", "merj", "a", "b"], "usage: dpocache store [-h] ACTION ...", "did you mean 'merge'?"),
    (["plot"], "usage: dpocache plot [-h] output_dir", "the following arguments are required: output_dir"),
    (["train", "--beta"], "usage: dpocache train [--config YAML]", "argument --beta: expected one argument"),
    (["train", "--loss_type", "nope", "--dry_run"], None, "error: loss_type: unknown loss 'nope'"),
])
def test_every_error_exits_2_with_one_line_or_the_usage(argv, usage, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and message in lines[-1]
    assert lines[0].startswith(usage) if usage else len(lines) == 1

