#!/usr/bin/env bash
# EE-Tuning on CPU, end to end: a Llama model in Hugging Face format gets early exits.
#   1. a corpus from the Python standard library, a byte-level BPE tokenizer.json, .bin/.idx
#   2. a small Llama (8 layers, hidden 192, grouped-query attention, untied embeddings) made
#      with transformers (random init), trained briefly, saved in Hugging Face format. The
#      training is ours (convert, pretrain_early_exit_gpt.py --finetune, export): on two CPU
#      cores it runs several times the tokens/s of a plain transformers training loop. From
#      step 3 on only the Hugging Face directory is used, as for a model from the Hub.
#   3. tools/checkpoint/convert_hf.py: Hugging Face -> our checkpoint, logits checked
#      against transformers
#   4. tools/checkpoint/add_exits.py: exits after layers 2 and 4, their norm and output
#      layer copied from the final ones
#   5. exit tuning: pretrain_early_exit_gpt.py --finetune --tune-exit (backbone frozen)
#   6. held-out losses of the exits before and after tuning; early-exit generation:
#      tools/calibrate_threshold.py sweeps confidence thresholds; the text generation server
#      answers a PUT /api request with early exit (exit layer of every token printed)
#   7. back to Hugging Face, exits included (transformers loads the backbone)
# Environment: OUT (default runs/ee_tuning), PRETRAIN_ITERS (150), TUNE_ITERS (100), NPROC (2).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/ee_tuning}
PRETRAIN_ITERS=${PRETRAIN_ITERS:-150}
TUNE_ITERS=${TUNE_ITERS:-100}
NPROC=${NPROC:-2}
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
rm -rf "$OUT"/hf* "$OUT"/llama* "$OUT/tensorboard"
mkdir -p "$OUT/hf-init"
SECONDS=0
step() { echo; echo "== $1 (${SECONDS}s)"; }
TRAIN=(--hidden-dropout 0 --attention-dropout 0 --micro-batch-size 4 --global-batch-size 16 --eval-iters 4
  --data-path "$OUT/stdlib_text_document" --split 98,2,0 --data-cache-path "$OUT/cache")
train() { "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" pretrain_early_exit_gpt.py "$@"; }

step "1/7 corpus, tokenizer.json, .bin/.idx"
"$PY" tools/build_corpus_from_stdlib.py --output "$OUT/stdlib.jsonl" --text-output "$OUT/stdlib.txt" --max-mb 3
"$PY" - "$OUT" <<'PYTHON'
import json, sys
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
out = sys.argv[1]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"], show_progress=False,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train([f"{out}/stdlib.txt"], trainer)
tok.save(f"{out}/hf-init/tokenizer.json")
json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"},
          open(f"{out}/hf-init/tokenizer_config.json", "w"))
print(f"  tokenizer.json: {tok.get_vocab_size()} tokens")
PYTHON
"$PY" tools/preprocess_data.py --input "$OUT/stdlib.jsonl" --output-prefix "$OUT/stdlib" \
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$OUT/hf-init" --append-eod --workers 2

step "2/7 a Llama made with transformers, trained for $PRETRAIN_ITERS iterations, saved in Hugging Face format"
"$PY" - "$OUT" <<'PYTHON'
import sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig(vocab_size=4096, hidden_size=192, intermediate_size=512, num_hidden_layers=8, num_attention_heads=6,
                     num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                     bos_token_id=0, eos_token_id=0)
LlamaForCausalLM(config).save_pretrained(f"{sys.argv[1]}/hf-init")
PYTHON
"$PY" tools/checkpoint/convert_hf.py --load "$OUT/hf-init" --save "$OUT/llama-init" --no-progress
train --use-checkpoint-args --load "$OUT/llama-init" --finetune "${TRAIN[@]}" --train-iters "$PRETRAIN_ITERS" \
  --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 15 --weight-decay 0.1 --adam-beta2 0.95 \
  --log-interval 25 --eval-interval "$PRETRAIN_ITERS" --save "$OUT/llama-pretrained"
"$PY" tools/checkpoint/convert_hf.py --direction to-hf --load "$OUT/llama-pretrained" --save "$OUT/hf" --no-progress

step "3/7 convert the Hugging Face model -> ours"
"$PY" tools/checkpoint/convert_hf.py --load "$OUT/hf" --save "$OUT/llama" --no-progress
"$PY" - "$OUT" <<'PYTHON'
import sys
import numpy as np
import torch
from transformers import LlamaForCausalLM


def main():
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.parallel import initialize_parallel

    out = sys.argv[1]
    initialize_parallel(1, 1)
    documents = IndexedDataset(f"{out}/stdlib_text_document")
    tokens = np.concatenate([documents[i] for i in range(len(documents) - 8, len(documents))])
    x = torch.from_numpy(tokens[: 4 * 256].astype(np.int64)).view(4, 256)
    with torch.no_grad():
        ours = load_model(f"{out}/llama", 1, device=torch.device("cpu"))[0](x, torch.arange(256).expand_as(x), None).final
        theirs = LlamaForCausalLM.from_pretrained(f"{out}/hf").eval()(input_ids=x, labels=x)
    print(f"  transformers' loss on 4 x 256 tokens: {theirs.loss.item():.3f}; "
          f"max |logits(ours) - logits(transformers)| = {(ours - theirs.logits).abs().max().item():.2e}")


if __name__ == "__main__":  # dist_checkpointing may start a helper process that re-imports this
    main()
PYTHON

step "4/7 add exits after layers 2 and 4 (copied from the final norm and output layer)"
"$PY" tools/checkpoint/add_exits.py --load "$OUT/llama" --save "$OUT/llama-ee" \
  --exit-layer-nums 2 4 --use-exit-norm --untie-exit-output-weights

step "5/7 exit tuning ($TUNE_ITERS iterations, backbone frozen, $NPROC processes)"
train --use-checkpoint-args --load "$OUT/llama-ee" --finetune --tune-exit "${TRAIN[@]}" --train-iters "$TUNE_ITERS" \
  --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 5 --weight-decay 0.0 \
  --log-interval 10 --eval-interval 50 --tensorboard-dir "$OUT/tensorboard" --save "$OUT/llama-ee-tuned"

step "6/7 held-out losses before and after exit tuning; early-exit generation: threshold sweep"
"$PY" - "$OUT" <<'PYTHON'
import json, random, sys
import numpy as np
import torch


def main():
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.parallel import initialize_parallel

    out = sys.argv[1]
    initialize_parallel(1, 1)
    documents = IndexedDataset(f"{out}/stdlib_text_document")
    tokens = np.concatenate([documents[i] for i in range(len(documents) - 8, len(documents))])
    x = torch.from_numpy(tokens[: 8 * 257].astype(np.int64)).view(8, 257)
    inputs, labels, positions = x[:, :-1], x[:, 1:], torch.arange(256).expand(8, -1)
    for name in ("llama-ee", "llama-ee-tuned"):
        with torch.no_grad():
            result = load_model(f"{out}/{name}", 1, device=torch.device("cpu"))[0](inputs, positions, None, labels=labels)
            losses = [f"exit {e.layer_number}: {e.compute_loss(False)[0].mean().item():.3f}" for e in result.exits]
        print(f"  {name:15s} {', '.join(losses)}, final: {result.final.mean().item():.3f}")
    docs = [json.loads(line)["text"] for line in open(f"{out}/stdlib.jsonl")]
    random.Random(0).shuffle(docs)
    with open(f"{out}/prompts.jsonl", "w") as f:
        for text in docs[:6]:
            f.write(json.dumps({"text": text[:300]}) + "\n")


if __name__ == "__main__":
    main()
PYTHON
"$PY" tools/calibrate_threshold.py --load "$OUT/llama-ee-tuned" --prompts-jsonl "$OUT/prompts.jsonl" \
  --max-prompts 6 --max-new-tokens 32 --thresholds 0.8 0.6 0.4 0.3 --min-agreement 0.9 --threads 2 || true

echo "-- serving the tuned model with early exit (tools/run_text_generation_server.py)"
"$PY" tools/run_text_generation_server.py --load "$OUT/llama-ee-tuned" --port 0 > "$OUT/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 120); do grep -q "^serving" "$OUT/server.log" && break; sleep 1; done
URL=$(sed -n 's/^serving .* on \(http:[^ ]*\).*/\1/p' "$OUT/server.log")
if [ -n "$URL" ]; then
  curl -s -X PUT "$URL/api" -H 'Content-Type: application/json' -d '{"prompts": ["def main():"],
    "tokens_to_generate": 24, "top_k": 1, "use_early_exit": true, "early_exit_thres": 0.3}' \
    | "$PY" -c 'import json, sys; r = json.load(sys.stdin); print("  text:", repr(r["text"][0])); print("  exit layers:", r["exit_layers"][0])'
else
  echo "  the server did not start; see $OUT/server.log"
fi
kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null || true

step "7/7 back to Hugging Face, exits included"
"$PY" tools/checkpoint/convert_hf.py --direction to-hf --load "$OUT/llama-ee-tuned" --save "$OUT/hf-ee" --no-progress
ls "$OUT/hf-ee"
echo "done in ${SECONDS}s"
