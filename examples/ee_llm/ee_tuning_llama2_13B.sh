#!/usr/bin/env bash
# EE-Tuning of Llama-2 13B from its Hugging Face checkpoint on GPUs: exits before layers 11 21
# (EE-LLM's placement at 1/4 and 1/2 depth: pre-exit, own norm and output layer, copied from
# the final ones), trained with the backbone frozen.
#   1. convert_hf.py  HF_DIR -> $WORK/llama2-13b (bf16; TP=2, PP=2 recorded)
#   2. add_exits.py   -> $WORK/llama2-13b-ee (copy init)
#   3. pretrain_early_exit_gpt.py --load $WORK/llama2-13b-ee --finetune --tune-exit
# Steps 1-2 run once, on one machine (CPU will do; about 27 GB of RAM); step 3 runs on
# NNODES x GPUS_PER_NODE GPUs (8 = TP 2 x PP 2 x DP 2). DATA_PATH is tokenized with the Llama-2 tokenizer:
#   python tools/preprocess_data.py --input data.jsonl --output-prefix data/corpus --append-eod \
#       --tokenizer-type HuggingFaceTokenizer --tokenizer-model $HF_DIR
#   HF_DIR=/models/Llama-2-13b-hf DATA_PATH=data/corpus_text_document bash examples/ee_llm/ee_tuning_llama2_13B.sh
# EE_PRINT_ARGS=1 prints the world size and the training flags instead of running.
NAME=llama2-13b; TP=2; PP=2
LAYER_ARGS=(--num-layers 40 --hidden-size 5120 --ffn-hidden-size 13824 --num-attention-heads 40)
EXIT_ARGS=(--exit-layer-nums 11 21 --pre-exit --use-exit-norm --untie-exit-output-weights)
source "$(dirname "$0")/_ee_tuning_llama2.sh"
