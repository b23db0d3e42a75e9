#!/usr/bin/env bash
# Quick start on CPU: a small early-exit GPT trained from text already on this machine.
#   1. a jsonl corpus from the Python standard library's sources
#   2. a SentencePiece tokenizer trained on it
#   3. Megatron's .bin/.idx format via tools/preprocess_data.py
#   4. pretraining with torchrun (2 processes, data parallel, gloo): 8 layers,
#      exits after layers 2 and 4, losses of every exit logged to stdout and TensorBoard
#   5. a summary: per-exit validation losses against the corpus's unigram entropy
#   6. early-exit decoding against full depth (speed, agreement, the layer each token left at),
#      and one picture of it: $OUT/early_exit.png (loss per exit over training, speed against
#      agreement per threshold)
# Environment: OUT (default runs/quickstart), ITERS (250), NPROC (2), TP (1), PP (1).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/quickstart}
ITERS=${ITERS:-250}
NPROC=${NPROC:-2}
TP=${TP:-1}
PP=${PP:-1}
WARMUP=$(( ITERS / 10 < 20 ? ITERS / 10 : 20 ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"

echo "== 1/6 corpus from the Python standard library"
"$PY" tools/build_corpus_from_stdlib.py --output "$OUT/stdlib.jsonl" --text-output "$OUT/stdlib.txt" --max-mb 6

echo "== 2/6 SentencePiece tokenizer"
"$PY" tools/train_tokenizer.py --input "$OUT/stdlib.txt" --model-prefix "$OUT/tokenizer" --vocab-size 4096

echo "== 3/6 preprocess to .bin/.idx"
"$PY" tools/preprocess_data.py --input "$OUT/stdlib.jsonl" --output-prefix "$OUT/stdlib" \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tokenizer.model" --append-eod --workers 2

echo "== 4/6 pretraining ($ITERS iterations, $NPROC processes)"
rm -rf "$OUT/tensorboard"
"$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" pretrain_early_exit_gpt.py \
  --num-layers 8 --hidden-size 192 --ffn-hidden-size 512 --num-attention-heads 6 \
  --seq-length 256 --max-position-embeddings 256 \
  --normalization RMSNorm --swiglu --position-embedding-type rope --disable-bias-linear \
  --untie-embeddings-and-output-weights --hidden-dropout 0 --attention-dropout 0 \
  --exit-layer-nums 2 4 --exit-layer-weight 0.25 0.5 --use-exit-norm \
  --micro-batch-size 4 --global-batch-size 16 --train-iters "$ITERS" \
  --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters "$WARMUP" --weight-decay 0.1 \
  --adam-beta2 0.95 --clip-grad 1.0 --seed 1234 \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --data-path "$OUT/stdlib_text_document" --split 98,2,0 --data-cache-path "$OUT/cache" \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tokenizer.model" \
  --log-interval 10 --eval-interval 50 --eval-iters 4 \
  --tensorboard-dir "$OUT/tensorboard" --save "$OUT/checkpoints"

echo "== 5/6 summary"
"$PY" examples/ee_llm/quickstart_summary.py --data-prefix "$OUT/stdlib_text_document" --tensorboard-dir "$OUT/tensorboard"

echo "== 6/6 early-exit decoding against full depth"
"$PY" examples/ee_llm/quickstart_generate.py --load "$OUT/checkpoints" --tensorboard-dir "$OUT/tensorboard" \
  --plot "$OUT/early_exit.png"
