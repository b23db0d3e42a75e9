# Shared body of the Llama-2 EE-Tuning examples; sourced after a script sets NAME (e.g.
# llama2-7b), TP, PP, LAYER_ARGS (its shape), EXIT_ARGS and optionally TUNE_ARGS and NNODES.
# EE_PRINT_ARGS=1 prints the world size and the training flags instead of running.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${HF_DIR:?set HF_DIR to a Hugging Face ${NAME/llama2/Llama-2} directory}"
: "${DATA_PATH:?set DATA_PATH to a preprocessed prefix (tools/preprocess_data.py)}"
: "${WORK:=checkpoints}" "${PY:=python}"
: "${NNODES:=1}" "${GPUS_PER_NODE:=8}" "${NODE_RANK:=0}" "${MASTER_ADDR:=localhost}" "${MASTER_PORT:=6000}"
BASE=$WORK/$NAME; EE=$WORK/$NAME-ee; TUNED=$WORK/$NAME-ee-tuned
MODEL_ARGS=("${LAYER_ARGS[@]}"
  --seq-length 2048 --max-position-embeddings 4096 --normalization RMSNorm --norm-epsilon 1e-05
  --swiglu --disable-bias-linear --position-embedding-type rope --rotary-base 10000
  --untie-embeddings-and-output-weights --make-vocab-size-divisible-by 1
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$EE/tokenizer")
# EE-LLM's tuning flags (examples/ee_tuning/tune/llama2_*_mlp_pt.sh) where they mean the same.
# Ours differ: the exits' placement and structure come from each script's EXIT_ARGS (EE-LLM
# tunes exit MLPs at every 5th layer); the tokenizer is the one the converted checkpoint
# holds (EE-LLM passes --tokenizer-type Llama2Tokenizer, with the same ids); and
# --make-vocab-size-divisible-by 1 keeps Llama 2's 32000 rows as EE-LLM's --padded-vocab-size 32000
# does, for any vocabulary. Append --no-use-flash-attn on a machine without flash-attn.
: "${WANDB_PROJECT=EE-TUNE}" "${WANDB_GROUP:=$NAME-ee}" "${RUN_NAME:=$(date "+%m%d-%H%M")}"
ARGS=("${MODEL_ARGS[@]}" "${EXIT_ARGS[@]}" --exit-layer-weight 1.0 1.0
  --tensor-model-parallel-size $TP --pipeline-model-parallel-size $PP ${TUNE_ARGS[@]+"${TUNE_ARGS[@]}"} --sequence-parallel
  --query-key-layer-scaling --use-flash-attn --bf16
  --load "$EE" --finetune --tune-exit --save "$TUNED" --save-interval 20000
  --micro-batch-size 4 --global-batch-size 16 --train-iters 40000
  --lr 0.0001 --min-lr 1.0e-5 --lr-warmup-fraction .01
  --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-5 --clip-grad 1.0
  --data-path "$DATA_PATH" --split 990,9,1
  --log-interval 10 --log-timers-to-tracker --eval-interval 50000 --eval-iters 1
  --wandb-project "$WANDB_PROJECT" --wandb-group "$WANDB_GROUP" --wandb-exp-name "$RUN_NAME"
  --tensorboard-dir "$TUNED/tensorboard" --exit-signal-handler "$@")

if [[ "${EE_PRINT_ARGS:-0}" == 1 ]]; then
  echo "WORLD_SIZE=$((NNODES * GPUS_PER_NODE))"
  printf '%s\n' "${ARGS[@]}"
  exit 0
fi
# Steps 1-2, once (skipped when their output exists). With several nodes, run
# PREPARE_ONLY=1 on one machine first, then the script on every node.
if [[ ! -f "$EE/latest_checkpointed_iteration.txt" ]]; then
  if [[ "$NNODES" -gt 1 && "${PREPARE_ONLY:-0}" != 1 ]]; then
    echo "error: $EE does not exist yet: run PREPARE_ONLY=1 $0 once, then launch every node" >&2
    exit 1
  fi
  [[ -f "$BASE/latest_checkpointed_iteration.txt" ]] || "$PY" tools/checkpoint/convert_hf.py --load "$HF_DIR" --save "$BASE" \
    --target-tensor-parallel-size $TP --target-pipeline-parallel-size $PP --target-dtype bf16
  "$PY" tools/checkpoint/add_exits.py --load "$BASE" --save "$EE" "${EXIT_ARGS[@]}"
fi
[[ "${PREPARE_ONLY:-0}" == 1 ]] && exit 0
exec "$PY" -m torch.distributed.run --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" pretrain_early_exit_gpt.py "${ARGS[@]}"
