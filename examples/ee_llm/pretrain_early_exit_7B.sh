#!/usr/bin/env bash
# Early-exit GPT 7B (EE-LLM's examples/ee_training/7B.sh): 32 layers, hidden 4096, 32 heads,
# SwiGLU MLP of 10880 (Megatron-LM's default for --swiglu); TP=1, PP=4 on 2 node(s) x 8 GPUs.
# Exits before layers 9 17 with loss weights 0.1 0.2; --untie-exit-output-weights --untie-embeddings-and-output-weights.
#   DATA_PATH=... TOKENIZER_MODEL=... bash examples/ee_llm/pretrain_early_exit_7B.sh [extra flags]
set -euo pipefail
NNODES=${NNODES:-2}
MODEL_ARGS=(--num-layers 32 --hidden-size 4096 --num-attention-heads 32 --untie-embeddings-and-output-weights)
PARALLEL_ARGS=(--tensor-model-parallel-size 1 --pipeline-model-parallel-size 4
  --micro-batch-size 2 --global-batch-size 2048 --train-iters $((240 * 10 * 80)))  # 800B tokens
EXIT_ARGS=(--untie-exit-output-weights --exit-layer-nums 9 17 --exit-layer-weight 0.1 0.2 --pre-exit)
source "$(dirname "$0")/_launch.sh"
