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
  --seq-length 4096 --max-position-embeddings 4096 --normalization RMSNorm --norm-epsilon 1e-05
  --swiglu --disable-bias-linear --position-embedding-type rope --rotary-base 10000
  --untie-embeddings-and-output-weights --make-vocab-size-divisible-by 1
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$EE/tokenizer")
ARGS=("${MODEL_ARGS[@]}" "${EXIT_ARGS[@]}" --exit-layer-weight 1.0 1.0
  --tensor-model-parallel-size $TP --pipeline-model-parallel-size $PP ${TUNE_ARGS[@]+"${TUNE_ARGS[@]}"} --sequence-parallel
  --use-distributed-optimizer --bf16 --hidden-dropout 0 --attention-dropout 0
  --load "$EE" --finetune --tune-exit --save "$TUNED" --save-interval 500
  --micro-batch-size 1 --global-batch-size 128 --train-iters 2000
  --lr 1e-4 --min-lr 1e-5 --lr-decay-style cosine --lr-warmup-iters 100 --weight-decay 0.1
  --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
  --data-path "$DATA_PATH" --split 990,9,1 --log-interval 10 --eval-interval 500 --eval-iters 10
  --tensorboard-dir "$TUNED/tensorboard" "$@")

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
