"""Train a SentencePiece tokenizer on a text file (used by the CPU quick start).

python tools/train_tokenizer.py --input corpus.txt --model-prefix data/tok --vocab-size 4096
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="plain text file")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=4096)
    args = p.parse_args()
    from megatron.early_exit.tokenizers import train_sentencepiece

    if not os.path.isfile(args.input):
        sys.exit(f"error: --input {args.input} does not exist")
    start = time.time()
    model = train_sentencepiece(args.input, args.model_prefix, args.vocab_size)
    print(f"trained SentencePiece ({args.vocab_size} pieces) in {time.time() - start:.1f}s -> {model}", file=sys.stderr)


if __name__ == "__main__":
    main()
