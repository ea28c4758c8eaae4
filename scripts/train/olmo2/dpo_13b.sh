#!/usr/bin/env bash
# Reproduce allenai/OLMo-2-1124-13B-DPO: 4 nodes x 8 GPUs, DeepSpeed ZeRO-3, bf16 (see recipe.bash).
#   bash scripts/train/olmo2/dpo_13b.sh --dry-run   # print both resolved configurations
SIZE=13 source "$(dirname "$0")/recipe.bash" "$@"
