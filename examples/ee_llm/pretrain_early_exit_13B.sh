#!/usr/bin/env bash
# Early-exit GPT 13B (EE-LLM's examples/ee_training/13B.sh): 40 layers, hidden 5120, 40 heads,
# SwiGLU MLP of 13632 (Megatron-LM's default for --swiglu); TP=2, PP=4 on 2 node(s) x 8 GPUs.
# Exits before layers 11 21 with loss weights 0.1 0.2; --untie-exit-output-weights --untie-embeddings-and-output-weights.
#   DATA_PATH=... TOKENIZER_MODEL=... bash examples/ee_llm/pretrain_early_exit_13B.sh [extra flags]
set -euo pipefail
NNODES=${NNODES:-2}
MODEL_ARGS=(--num-layers 40 --hidden-size 5120 --num-attention-heads 40 --untie-embeddings-and-output-weights)
PARALLEL_ARGS=(--tensor-model-parallel-size 2 --pipeline-model-parallel-size 4
  --micro-batch-size 1 --global-batch-size 2048 --train-iters $((240 * 10 * 80)))  # 800B tokens
EXIT_ARGS=(--untie-exit-output-weights --exit-layer-nums 11 21 --exit-layer-weight 0.1 0.2 --pre-exit)
source "$(dirname "$0")/_launch.sh"
