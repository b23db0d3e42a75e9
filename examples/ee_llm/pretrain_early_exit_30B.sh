#!/usr/bin/env bash
# Early-exit GPT 30B (EE-LLM's examples/ee_training/30B.sh): 60 layers, hidden 6656, 52 heads,
# SwiGLU MLP of 17728 (Megatron-LM's default for --swiglu); TP=4, PP=4 on 4 node(s) x 8 GPUs.
# Exits before layers 16 31 with loss weights 0.1 0.2; --untie-exit-output-weights --untie-embeddings-and-output-weights.
#   DATA_PATH=... TOKENIZER_MODEL=... bash examples/ee_llm/pretrain_early_exit_30B.sh [extra flags]
set -euo pipefail
NNODES=${NNODES:-4}
MODEL_ARGS=(--num-layers 60 --hidden-size 6656 --num-attention-heads 52 --untie-embeddings-and-output-weights)
PARALLEL_ARGS=(--tensor-model-parallel-size 4 --pipeline-model-parallel-size 4
  --micro-batch-size 1 --global-batch-size 2048 --train-iters $((240 * 10 * 80)))  # 800B tokens
EXIT_ARGS=(--untie-exit-output-weights --exit-layer-nums 16 31 --exit-layer-weight 0.1 0.2 --pre-exit)
source "$(dirname "$0")/_launch.sh"
