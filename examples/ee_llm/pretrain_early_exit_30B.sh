#!/usr/bin/env bash
# Early-exit GPT 30B (EE-LLM's shape): 60 layers, hidden 6656, 52 heads; TP=4, PP=4 on 4 node(s) x 8 GPUs.
# Exits before layers 16 31 with loss weights 0.1 0.2; --untie-exit-output-weights --untie-embeddings-and-output-weights.
#   DATA_PATH=... TOKENIZER_MODEL=... bash examples/ee_llm/pretrain_early_exit_30B.sh [extra flags]
set -euo pipefail
NNODES=${NNODES:-4}
MODEL_ARGS=(--num-layers 60 --hidden-size 6656 --ffn-hidden-size 17920 --num-attention-heads 52)
PARALLEL_ARGS=(--tensor-model-parallel-size 4 --pipeline-model-parallel-size 4
  --micro-batch-size 2 --global-batch-size 1024 --train-iters 100000 --lr 1.5e-4 --min-lr 1e-5 --lr-warmup-iters 2000)
EXIT_ARGS=(--exit-layer-nums 16 31 --exit-layer-weight 0.1 0.2 --pre-exit --use-exit-norm --untie-exit-output-weights --untie-embeddings-and-output-weights)
source "$(dirname "$0")/_launch.sh"
