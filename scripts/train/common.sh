#!/usr/bin/env bash
# Shared helpers of the recipe scripts.
#   DRY_RUN=1 (or --dry-run as the first argument): print the resolved configuration of each stage
#   (`dpocache ... --dry_run`) without loading a model or launching anything.
#   DPOCACHE: the dpocache command (default: `dpocache`, else `python -m dpocache.cli`).
set -euo pipefail
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
DRY_RUN=${DRY_RUN:-0}
if [[ -z "${DPOCACHE:-}" ]]; then
  if command -v dpocache >/dev/null 2>&1; then DPOCACHE=dpocache; else DPOCACHE="python -m dpocache.cli"; fi
fi
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

# stage ARGS...: run one stage, or print its resolved configuration on a dry run.
stage() {
  if [[ "$DRY_RUN" == "1" ]]; then
    $DPOCACHE "$@" --dry_run
  else
    $DPOCACHE "$@"
  fi
}

# launch_train LAUNCHER_ARGS... -- DPOCACHE_ARGS...: stage two under accelerate (multi-node ready).
launch_train() {
  local launcher=()
  while [[ $# -gt 0 && "$1" != "--" ]]; do launcher+=("$1"); shift; done
  shift
  if [[ "$DRY_RUN" == "1" ]]; then
    echo "# launcher: accelerate launch ${launcher[*]} -m dpocache.cli train ..."
    $DPOCACHE train "$@" --dry_run
  else
    accelerate launch "${launcher[@]}" -m dpocache.cli train "$@"
  fi
}
