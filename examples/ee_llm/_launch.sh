# Shared launcher for the GPU-cluster examples; sourced after a script fills MODEL_ARGS,
# PARALLEL_ARGS and EXIT_ARGS. The flags are EE-LLM's (examples/ee_training/*.sh) with their
# meanings; where these differ, a comment says why. Set EE_PRINT_ARGS=1 to print the world
# size and the argument list instead of launching (the tests validate every script this way).
#
# On a machine without CUDA, Transformer Engine and flash-attn, --use-flash-attn stops the
# run with a one-line error; append --no-use-flash-attn to run there. WANDB_PROJECT="" turns
# Weights & Biases off (pip install wandb, or megatron-early-exit[wandb], to use it).
: "${NNODES:=1}" "${GPUS_PER_NODE:=8}" "${NODE_RANK:=0}" "${MASTER_ADDR:=localhost}" "${MASTER_PORT:=6000}"
: "${DATA_PATH:?set DATA_PATH to a preprocessed prefix (tools/preprocess_data.py)}"
: "${TOKENIZER_MODEL:?set TOKENIZER_MODEL to a SentencePiece .model}"
: "${CHECKPOINT_PATH:=checkpoints/$(basename "$0" .sh)}"
: "${TENSORBOARD_DIR:=$CHECKPOINT_PATH/tensorboard}"
: "${WANDB_PROJECT=EE-LLM}" "${WANDB_GROUP:=$(basename "$0" .sh)}" "${RUN_NAME:=$(date "+%m%d-%H%M")}"

SAVE_INTERVAL=$((240 * 10))  # EE-LLM's: 10B tokens at 2048 x 2048 per iteration
COMMON_ARGS=(
  --seq-length 2048 --max-position-embeddings 2048 --sequence-parallel
  --lr 0.0003 --lr-decay-style cosine --min-lr 3.0e-5 --weight-decay 1e-1 --lr-warmup-iters 2000
  --adam-beta1 0.9 --adam-beta2 0.95 --init-method-std 0.01 --clip-grad 1.0
  --bf16 --disable-bias-linear --use-flash-attn --normalization RMSNorm --position-embedding-type rope --swiglu
  --data-path "$DATA_PATH" --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
  --split 990,9,1
  --log-interval 2 --log-timers-to-tracker --save-interval $SAVE_INTERVAL --eval-interval $((240 * 5)) --eval-iters 10
  --wandb-project "$WANDB_PROJECT" --wandb-group "$WANDB_GROUP" --wandb-exp-name "$RUN_NAME"
  --save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH"
  # Not in EE-LLM's scripts: TensorBoard beside wandb, and on SIGTERM (sent by schedulers
  # before preemption) finish the iteration, save, and exit 0; --load resumes from there.
  --tensorboard-dir "$TENSORBOARD_DIR" --exit-signal-handler
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
