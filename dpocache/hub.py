"""Publishing a trained model to the Hugging Face Hub (``--push_to_hub``).

The upload is the saved Hugging Face model of ``output_dir`` in one commit: weights (safetensors),
configs, tokenizer files (with the chat template) and the README.md model card. Only top-level files
are sent, so ``checkpoints/``, ``wandb/``, tensorboard runs and plots never are; run logs
(``metrics.jsonl``, ``summary.json``) and hidden or temporary files are left out too.

The token comes from ``HF_TOKEN`` or the huggingface_hub token store (``hf auth login``); it is only
ever handed to ``huggingface_hub`` and never appears in a message. ``HF_ENDPOINT`` and
``HF_HUB_OFFLINE`` are read when the upload runs. A failed upload leaves the local model as it is
and says how to upload it later with ``python -m dpocache.hub OUTPUT_DIR --hf_repo_id REPO``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from dpocache.config import ConfigError, parse_bool
from dpocache.console import log

DEFAULT_ENDPOINT = "https://huggingface.co"
RUN_FILES = frozenset({"metrics.jsonl", "summary.json"})


class HubError(RuntimeError):
    """The upload to the Hub failed; the message says where the local model is and how to retry."""


def hub_token() -> str | None:
    """The token huggingface_hub would use (``HF_TOKEN``, then the token store), or None."""
    from huggingface_hub import get_token

    return get_token()


def hub_endpoint() -> str:
    """``HF_ENDPOINT`` as set now (not when huggingface_hub was imported), else the public Hub."""
    return (os.environ.get("HF_ENDPOINT") or "").strip().rstrip("/") or DEFAULT_ENDPOINT


def offline_mode() -> bool:
    """Offline mode as set now, or as huggingface_hub read it at import (it then refuses every request)."""
    from huggingface_hub import constants

    now = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().upper()
    return now in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def check_hub_access(cfg) -> None:
    """Before any work: ``--push_to_hub`` needs a token (a ConfigError otherwise)."""
    if not cfg.push_to_hub:
        return
    if not hub_token():
        raise ConfigError(f"push_to_hub: no Hugging Face token found for {cfg.hf_repo_id}; set HF_TOKEN or run "
                          "`hf auth login` (a token with write access), or drop --push_to_hub. Nothing was trained.")
    if offline_mode():
        log("push_to_hub: offline mode is on (HF_HUB_OFFLINE): the model will be saved locally, but the upload "
            "at the end will fail unless offline mode is turned off")


def upload_files(output_dir: str | Path) -> list[Path]:
    """The files of the saved model in ``output_dir``, sorted (top level only; no logs, hidden or temp files)."""
    root = Path(output_dir)
    files = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        name = path.name
        if not path.is_file() or path.is_symlink() or name.startswith(".") or name in RUN_FILES:
            continue
        if ".tmp" in name or name.endswith(("~", ".lock")) or name.startswith("events.out.tfevents"):
            continue
        files.append(path)
    return files


def retry_command(output_dir: str | Path, repo_id: str, revision: str | None, private: bool) -> str:
    """The command that uploads ``output_dir`` later with the same settings."""
    cmd = ["python", "-m", "dpocache.hub", str(output_dir), "--hf_repo_id", repo_id]
    if revision:
        cmd += ["--hf_repo_revision", revision]
    if not private:
        cmd += ["--hf_private", "false"]
    return shlex.join(cmd)


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def push_to_hub(output_dir: str | Path, repo_id: str, *, revision: str | None = None, private: bool = True,
                commit_message: str | None = None) -> str:
    """Create the repository (and branch), upload the saved model in one commit; returns the commit URL.

    Raises :class:`ConfigError` without a token or without a saved model, and :class:`HubError` when
    the Hub cannot be reached or refuses the upload (offline mode, no network, HTTP errors).
    """
    out = Path(output_dir).resolve()
    files = upload_files(out)
    if not any(p.suffix == ".safetensors" for p in files):
        raise ConfigError(f"push_to_hub: {out} holds no saved model (*.safetensors); nothing to upload")
    later = retry_command(out, repo_id, revision, private)
    token = hub_token()
    if not token:
        raise ConfigError(f"push_to_hub: no Hugging Face token found; set HF_TOKEN or run `hf auth login`. "
                          f"The model is saved locally at {out}; upload it later with: {later}")
    endpoint = hub_endpoint()
    if offline_mode():
        raise HubError(f"push_to_hub: offline mode is on (HF_HUB_OFFLINE), so nothing was uploaded to {repo_id}. "
                       f"The model is saved locally at {out}; upload it later (with network access, offline mode "
                       f"off) with: {later}")
    size = sum(p.stat().st_size for p in files)
    where = f"{endpoint}/{repo_id}" + (f" (branch {revision})" if revision else "")
    log(f"push_to_hub: uploading {len(files)} files ({size / 2**20:.1f} MiB) from {out} to {where}, "
        f"{'private' if private else 'public'}")
    try:
        url = _upload(endpoint, token, out, files, repo_id, revision, private,
                      commit_message or f"Upload {out.name} trained with dpocache")
    except Exception as exc:  # noqa: BLE001 - every failure becomes one message that keeps the token out
        reason = _redact(f"{type(exc).__name__}: {exc}", token).strip().replace("\n", " ")
        raise HubError(f"push_to_hub: the upload to {where} failed ({reason[:600]}). Nothing saved was lost: the "
                       f"model is saved locally at {out}; upload it later with: {later}") from None
    log(f"push_to_hub: uploaded to {url}")
    return url


def _upload(endpoint: str, token: str, out: Path, files: list[Path], repo_id: str, revision: str | None,
            private: bool, message: str) -> str:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=endpoint, token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    full_id = getattr(repo, "repo_id", None) or repo_id
    if revision and revision != "main":
        api.create_branch(full_id, branch=revision, exist_ok=True, repo_type="model")
    ops = [CommitOperationAdd(path_in_repo=p.relative_to(out).as_posix(), path_or_fileobj=str(p)) for p in files]
    info = api.create_commit(full_id, operations=ops, commit_message=message, revision=revision,
                             repo_type="model")
    return str(getattr(info, "commit_url", None) or f"{endpoint}/{full_id}")


def push_output(cfg, loss_cfg) -> str:
    """Push ``cfg.output_dir`` with the hub settings of a :class:`TrainConfig`."""
    return push_to_hub(cfg.output_dir, cfg.hf_repo_id, revision=cfg.hf_repo_revision, private=cfg.hf_private,
                       commit_message=f"Upload {Path(cfg.output_dir).resolve().name} ({loss_cfg.loss_type}, dpocache)")


def main(argv: list[str] | None = None) -> int:
    """``python -m dpocache.hub OUTPUT_DIR --hf_repo_id REPO``: upload an already saved model."""
    from dpocache.stages.train.config import valid_branch, valid_repo_id

    parser = argparse.ArgumentParser(prog="python -m dpocache.hub",
                                     description="Upload a model saved by `dpocache train` to the Hugging Face Hub.")
    parser.add_argument("output_dir", help="the training output directory (the saved model)")
    parser.add_argument("--hf_repo_id", "--hf-repo-id", required=True, help="org/name or name")
    parser.add_argument("--hf_repo_revision", "--hf-repo-revision", help="branch (created when missing)")
    parser.add_argument("--hf_private", "--hf-private", type=parse_bool, default=True, metavar="true|false",
                        help="create the repository private (default: true)")
    args = parser.parse_args(argv)
    try:
        if not valid_repo_id(args.hf_repo_id):
            raise ConfigError(f"hf_repo_id: {args.hf_repo_id!r} is not a Hub repository id (org/name or name)")
        if args.hf_repo_revision is not None and not valid_branch(args.hf_repo_revision):
            raise ConfigError(f"hf_repo_revision: {args.hf_repo_revision!r} is not a branch name")
        push_to_hub(args.output_dir, args.hf_repo_id, revision=args.hf_repo_revision, private=args.hf_private)
    except (ConfigError, HubError) as exc:
        print(f"dpocache.hub: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
