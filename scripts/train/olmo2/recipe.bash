# The OLMo 2 DPO recipe shared by dpo_7b.sh and dpo_13b.sh (which set SIZE): 4 nodes x 8 GPUs,
# DeepSpeed ZeRO-3, bf16. Stage one (vLLM scoring) and stage two (training) are separate jobs that may
# run on different clusters; see scripts/train/tulu3/dpo_8b.sh for moving and verifying the store.
: "${SIZE:?set SIZE=7 or SIZE=13}"
source "$(dirname "$0")/../common.sh"
MODEL=${MODEL:-allenai/OLMo-2-1124-${SIZE}B-SFT}
DATA=${DATA:-allenai/olmo-2-1124-${SIZE}b-preference-mix}
STORE=${STORE:-stores/olmo2-${SIZE}b-sft}
OUT=${OUT:-output/olmo2_${SIZE}b_dpo}

stage score \
  --model_name_or_path "$MODEL" \
  --mixer_list "$DATA" 1.0 \
  --max_seq_length 2048 \
  --add_bos \
  --dtype bfloat16 \
  --backend vllm \
  --store "$STORE" \
  --store_dataset olmo2-${SIZE}b-mix

launch_train \
  --config_file "$REPO_ROOT/scripts/configs/accelerate_zero3.yaml" \
  --num_machines 4 --num_processes 32 \
  --machine_rank "${MACHINE_RANK:-0}" --main_process_ip "${MAIN_PROCESS_IP:-127.0.0.1}" \
  -- \
  --model_name_or_path "$MODEL" \
  --store "$STORE" \
  --store_dataset olmo2-${SIZE}b-mix \
  --output_dir "$OUT" \
  --loss_type dpo_norm \
  --beta 5 \
  --learning_rate 1e-6 \
  --lr_scheduler_type linear \
  --warmup_ratio 0.1 \
  --weight_decay 0.0 \
  --num_epochs 1 \
  --per_device_train_batch_size 1 \
  --gradient_accumulation_steps 4 \
  --dtype bfloat16 \
  --gradient_checkpointing \
  --logging_steps 1 \
  --checkpointing_steps 500 \
  --resume_from_checkpoint auto "$@"
