#!/usr/bin/env bash
# Early-exit GPT 7B (EE-LLM's shape): 32 layers, hidden 4096, 32 heads; TP=1, PP=4 on 2 node(s) x 8 GPUs.
# Exits before layers 9 17 with loss weights 0.1 0.2; --untie-exit-output-weights --untie-embeddings-and-output-weights.
#   DATA_PATH=... TOKENIZER_MODEL=... bash examples/ee_llm/pretrain_early_exit_7B.sh [extra flags]
set -euo pipefail
NNODES=${NNODES:-2}
MODEL_ARGS=(--num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008 --num-attention-heads 32)
PARALLEL_ARGS=(--tensor-model-parallel-size 1 --pipeline-model-parallel-size 4
  --micro-batch-size 2 --global-batch-size 1024 --train-iters 100000 --lr 3e-4 --min-lr 1e-5 --lr-warmup-iters 2000)
EXIT_ARGS=(--exit-layer-nums 9 17 --exit-layer-weight 0.1 0.2 --pre-exit --use-exit-norm --untie-exit-output-weights --untie-embeddings-and-output-weights)
source "$(dirname "$0")/_launch.sh"
