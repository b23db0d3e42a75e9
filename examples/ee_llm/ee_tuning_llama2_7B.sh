#!/usr/bin/env bash
# EE-Tuning of Llama-2 7B from its Hugging Face checkpoint on GPUs: exits before layers 9 17
# (EE-LLM's placement at 1/4 and 1/2 depth: pre-exit, own norm and output layer, copied from
# the final ones), trained with the backbone frozen.
#   1. convert_hf.py  HF_DIR -> $WORK/llama2-7b (bf16; TP=1, PP=2 recorded)
#   2. add_exits.py   -> $WORK/llama2-7b-ee (copy init)
#   3. pretrain_early_exit_gpt.py --load $WORK/llama2-7b-ee --finetune --tune-exit
# Steps 1-2 run once, on one machine (CPU will do; about 14 GB of RAM); step 3 runs on
# NNODES x GPUS_PER_NODE GPUs (8 = TP 1 x PP 2 x DP 4). DATA_PATH is tokenized with the Llama-2 tokenizer:
#   python tools/preprocess_data.py --input data.jsonl --output-prefix data/corpus --append-eod \
#       --tokenizer-type HuggingFaceTokenizer --tokenizer-model $HF_DIR
#   HF_DIR=/models/Llama-2-7b-hf DATA_PATH=data/corpus_text_document bash examples/ee_llm/ee_tuning_llama2_7B.sh
# EE_PRINT_ARGS=1 prints the world size and the training flags instead of running.
NAME=llama2-7b; TP=1; PP=2
LAYER_ARGS=(--num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008 --num-attention-heads 32)
EXIT_ARGS=(--exit-layer-nums 9 17 --pre-exit --use-exit-norm --untie-exit-output-weights)
source "$(dirname "$0")/_ee_tuning_llama2.sh"
