#!/usr/bin/env bash
# Reproduce allenai/OLMo-2-1124-7B-DPO: 4 nodes x 8 GPUs, DeepSpeed ZeRO-3, bf16 (see recipe.bash).
#   bash scripts/train/olmo2/dpo_7b.sh --dry-run   # print both resolved configurations
SIZE=7 source "$(dirname "$0")/recipe.bash" "$@"
