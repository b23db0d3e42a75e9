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
: "${NNODES:=3}"
NAME=llama2-70b; TP=8; PP=4
LAYER_ARGS=(--num-layers 80 --hidden-size 8192 --ffn-hidden-size 28672 --num-attention-heads 64
  --group-query-attention --num-query-groups 8)
EXIT_ARGS=(--exit-layer-nums 21 41 --pre-exit --use-exit-norm --untie-exit-output-weights)
TUNE_ARGS=(--tune-exit-pipeline-parallel-size 3)
source "$(dirname "$0")/_ee_tuning_llama2.sh"
