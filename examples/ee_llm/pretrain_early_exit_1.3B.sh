#!/usr/bin/env bash
# Early-exit GPT 1.3B (EE-LLM's examples/ee_training/1-3B.sh): 24 layers, hidden 2048, 32 heads,
# SwiGLU MLP of 5440 (Megatron-LM's default for --swiglu), tied embeddings; TP=1, PP=4 on
# 1 node(s) x 8 GPUs. Exits before layers 7 13 with loss weights 0.25 0.5, sharing the word embedding.
#   DATA_PATH=... TOKENIZER_MODEL=... bash examples/ee_llm/pretrain_early_exit_1.3B.sh [extra flags]
set -euo pipefail
NNODES=${NNODES:-1}
MODEL_ARGS=(--num-layers 24 --hidden-size 2048 --num-attention-heads 32)
PARALLEL_ARGS=(--tensor-model-parallel-size 1 --pipeline-model-parallel-size 4
  --micro-batch-size 4 --global-batch-size 2048 --train-iters $((240 * 10 * 30)))  # 300B tokens
EXIT_ARGS=(--exit-layer-nums 7 13 --exit-layer-weight 0.25 0.5 --pre-exit)
source "$(dirname "$0")/_launch.sh"
