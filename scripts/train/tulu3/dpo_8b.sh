#!/usr/bin/env bash
# Reproduce allenai/Llama-3.1-Tulu-3-8B-DPO: 4 nodes x 8 GPUs, DeepSpeed ZeRO-3, bf16.
#
# The two stages are separate jobs and may run on different clusters:
#   1. Stage one (scoring cluster, vLLM backend): writes the reference store to $STORE.
#      With several jobs, give each `--num_shards N --shard_index I` and its own sub-store, then
#      `dpocache store merge $STORE part0 part1 ...`.
#   2. Move the store (it is a relocatable directory: rsync -a $STORE other-cluster:$STORE), then
#      `dpocache inspect $STORE --verify` there.
#   3. Stage two (training cluster): reads only the store and the policy; launch on every node with
#      MACHINE_RANK and MAIN_PROCESS_IP set by your scheduler.
#   bash scripts/train/tulu3/dpo_8b.sh --dry-run   # print both resolved configurations
source "$(dirname "$0")/../common.sh"
MODEL=${MODEL:-allenai/Llama-3.1-Tulu-3-8B-SFT}
DATA=${DATA:-allenai/llama-3.1-tulu-3-8b-preference-mixture}
STORE=${STORE:-stores/tulu3-8b-sft}
OUT=${OUT:-output/tulu3_8b_dpo}

stage score \
  --model_name_or_path "$MODEL" \
  --mixer_list "$DATA" 1.0 \
  --max_seq_length 2048 \
  --dtype bfloat16 \
  --backend vllm \
  --vllm_tensor_parallel_size 1 \
  --store "$STORE" \
  --store_dataset tulu3-8b-mix \
  --seed 8

launch_train \
  --config_file "$REPO_ROOT/scripts/configs/accelerate_zero3.yaml" \
  --num_machines 4 --num_processes 32 \
  --machine_rank "${MACHINE_RANK:-0}" --main_process_ip "${MAIN_PROCESS_IP:-127.0.0.1}" \
  -- \
  --model_name_or_path "$MODEL" \
  --store "$STORE" \
  --store_dataset tulu3-8b-mix \
  --output_dir "$OUT" \
  --loss_type dpo_norm \
  --beta 5 \
  --learning_rate 5e-7 \
  --lr_scheduler_type linear \
  --warmup_ratio 0.1 \
  --weight_decay 0.0 \
  --num_epochs 1 \
  --per_device_train_batch_size 1 \
  --gradient_accumulation_steps 16 \
  --dtype bfloat16 \
  --gradient_checkpointing \
  --logging_steps 1 \
  --checkpointing_steps 500 \
  --resume_from_checkpoint auto \
  --seed 8 "$@"
