#!/usr/bin/env bash
# EE-Tuning of Llama-2 70B from its Hugging Face checkpoint on GPUs: exits before layers 21 41
# (EE-LLM's placement at 1/4 and 1/2 depth: pre-exit, own norm and output layer, copied from
# the final ones), trained with the backbone frozen.
#   1. convert_hf.py  HF_DIR -> $WORK/llama2-70b (bf16; TP=8, PP=4 recorded)
#   2. add_exits.py   -> $WORK/llama2-70b-ee (copy init)
#   3. pretrain_early_exit_gpt.py --load $WORK/llama2-70b-ee --finetune --tune-exit --tune-exit-pipeline-parallel-size 3:
#      both exits lie in the first 3 of 4 stages (layers 1-60), so only those are built and loaded
#   4. afterwards, the tuned exits go back on the whole 80-layer model (the tuned checkpoint holds layers 1-60):
#      python tools/checkpoint/add_exits.py --load $WORK/llama2-70b-ee --exits-from $WORK/llama2-70b-ee-tuned \
#          --save $WORK/llama2-70b-ee-final
# Steps 1-2 run once, on one machine (CPU will do; about 140 GB of RAM); step 3 runs on
# NNODES x GPUS_PER_NODE GPUs (24 = TP 8 x PP 3). DATA_PATH is tokenized with the Llama-2 tokenizer:
#   python tools/preprocess_data.py --input data.jsonl --output-prefix data/corpus --append-eod \
#       --tokenizer-type HuggingFaceTokenizer --tokenizer-model $HF_DIR
#   HF_DIR=/models/Llama-2-70b-hf DATA_PATH=data/corpus_text_document bash examples/ee_llm/ee_tuning_llama2_70B.sh
# EE_PRINT_ARGS=1 prints the world size and the training flags instead of running.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${HF_DIR:?set HF_DIR to a Hugging Face Llama-2-70b directory}"
: "${DATA_PATH:?set DATA_PATH to a preprocessed prefix (tools/preprocess_data.py)}"
: "${WORK:=checkpoints}" "${PY:=python}"
: "${NNODES:=3}" "${GPUS_PER_NODE:=8}" "${NODE_RANK:=0}" "${MASTER_ADDR:=localhost}" "${MASTER_PORT:=6000}"
TP=8; PP=4
BASE=$WORK/llama2-70b; EE=$WORK/llama2-70b-ee; TUNED=$WORK/llama2-70b-ee-tuned
EXIT_ARGS=(--exit-layer-nums 21 41 --pre-exit --use-exit-norm --untie-exit-output-weights)
MODEL_ARGS=(--num-layers 80 --hidden-size 8192 --ffn-hidden-size 28672 --num-attention-heads 64
  --group-query-attention --num-query-groups 8
  --seq-length 4096 --max-position-embeddings 4096 --normalization RMSNorm --norm-epsilon 1e-05
  --swiglu --disable-bias-linear --position-embedding-type rope --rotary-base 10000
  --untie-embeddings-and-output-weights --make-vocab-size-divisible-by 1
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$EE/tokenizer")
ARGS=("${MODEL_ARGS[@]}" "${EXIT_ARGS[@]}" --exit-layer-weight 1.0 1.0
  --tensor-model-parallel-size $TP --pipeline-model-parallel-size $PP --tune-exit-pipeline-parallel-size 3 --sequence-parallel
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
