# Shared launcher for the GPU-cluster examples; sourced after a script fills MODEL_ARGS,
# PARALLEL_ARGS and EXIT_ARGS. Set EE_PRINT_ARGS=1 to print the world size and the
# argument list instead of launching (the tests validate every script this way).
: "${NNODES:=1}" "${GPUS_PER_NODE:=8}" "${NODE_RANK:=0}" "${MASTER_ADDR:=localhost}" "${MASTER_PORT:=6000}"
: "${DATA_PATH:?set DATA_PATH to a preprocessed prefix (tools/preprocess_data.py)}"
: "${TOKENIZER_MODEL:?set TOKENIZER_MODEL to a SentencePiece .model}"
: "${CHECKPOINT_PATH:=checkpoints/$(basename "$0" .sh)}"
: "${TENSORBOARD_DIR:=$CHECKPOINT_PATH/tensorboard}"

COMMON_ARGS=(
  --seq-length 2048 --max-position-embeddings 2048
  --normalization RMSNorm --swiglu --position-embedding-type rope --disable-bias-linear
  --hidden-dropout 0 --attention-dropout 0 --init-method-std 0.02
  --bf16 --sequence-parallel --use-distributed-optimizer
  --lr-decay-style cosine --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
  --data-path "$DATA_PATH" --split 949,50,1
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
  --log-interval 10 --eval-interval 1000 --eval-iters 10
  --save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH" --save-interval 1000
  --tensorboard-dir "$TENSORBOARD_DIR"
)
ARGS=("${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${EXIT_ARGS[@]}" "${COMMON_ARGS[@]}" "$@")

if [[ "${EE_PRINT_ARGS:-0}" == 1 ]]; then
  echo "WORLD_SIZE=$((NNODES * GPUS_PER_NODE))"
  printf '%s\n' "${ARGS[@]}"
  exit 0
fi
exec torchrun --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  "$(dirname "$0")/../../pretrain_early_exit_gpt.py" "${ARGS[@]}"
