#!/usr/bin/env bash
# Single device, tiny: scores a small slice of the embedded preference set with the embedded
# SmolLM2-135M-Instruct and trains a few steps. Runs on a laptop CPU in about a minute.
#   bash scripts/train/debug/dpo.sh            # run
#   bash scripts/train/debug/dpo.sh --dry-run  # print the resolved configuration only
source "$(dirname "$0")/../common.sh"
OUT=${OUT:-output/debug_dpo}
stage run \
  --max_train_samples 32 \
  --max_seq_length 256 \
  --per_device_train_batch_size 4 \
  --gradient_accumulation_steps 1 \
  --learning_rate 5e-6 \
  --beta 5 \
  --loss_type dpo_norm \
  --max_train_steps 4 \
  --logging_steps 1 \
  --overwrite_output_dir \
  --output_dir "$OUT" "$@"
