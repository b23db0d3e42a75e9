#!/usr/bin/env bash
# Early-exit GPT 13B (EE-LLM's shape): 40 layers, hidden 5120, 40 heads; TP=2, PP=4 on 2 node(s) x 8 GPUs.
# Exits before layers 11 21 with loss weights 0.1 0.2; --untie-exit-output-weights --untie-embeddings-and-output-weights.
#   DATA_PATH=... TOKENIZER_MODEL=... bash examples/ee_llm/pretrain_early_exit_13B.sh [extra flags]
set -euo pipefail
NNODES=${NNODES:-2}
MODEL_ARGS=(--num-layers 40 --hidden-size 5120 --ffn-hidden-size 13824 --num-attention-heads 40)
PARALLEL_ARGS=(--tensor-model-parallel-size 2 --pipeline-model-parallel-size 4
  --micro-batch-size 2 --global-batch-size 1024 --train-iters 100000 --lr 2e-4 --min-lr 1e-5 --lr-warmup-iters 2000)
EXIT_ARGS=(--exit-layer-nums 11 21 --exit-layer-weight 0.1 0.2 --pre-exit --use-exit-norm --untie-exit-output-weights --untie-embeddings-and-output-weights)
source "$(dirname "$0")/_launch.sh"
