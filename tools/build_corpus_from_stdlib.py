"""Build a jsonl text corpus from the Python standard library's sources (present on any
machine with Python), for the CPU quick start: one document per module, source and
docstrings as they are.

    python tools/build_corpus_from_stdlib.py --output data/stdlib.jsonl --max-mb 8
"""

import argparse
import json
import os
import sys
import sysconfig
import time


def iter_sources(root: str):
    for dirpath, dirnames, filenames in os.walk(root):
        # Tests and vendored packages are large and repetitive; skip them.
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("test", "tests", "site-packages", "idle_test", "__pycache__")
        )
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    p.add_argument("--max-mb", type=float, default=8.0)
    p.add_argument("--text-output", default=None, help="also write the raw text (tokenizer training input)")
    args = p.parse_args()
    root = sysconfig.get_paths()["stdlib"]
    limit = int(args.max_mb * 1e6)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    written, docs, start = 0, 0, time.time()
    tmp = args.output + ".tmp"
    text_out = open(args.text_output + ".tmp", "w") if args.text_output else None
    with open(tmp, "w") as out:
        for path in iter_sources(root):
            try:
                text = open(path, encoding="utf-8").read()
            except (UnicodeDecodeError, OSError):
                continue
            if len(text) < 200:
                continue
            out.write(json.dumps({"text": text, "source": os.path.relpath(path, root)}) + "\n")
            if text_out:
                text_out.write(text + "\n")
            written += len(text.encode())
            docs += 1
            if docs % 100 == 0:
                print(f"\r  {docs} documents, {written / 1e6:.1f} MB", end="", file=sys.stderr, flush=True)
            if written >= limit:
                break
    os.replace(tmp, args.output)
    if text_out:
        text_out.close()
        os.replace(args.text_output + ".tmp", args.text_output)
    if docs == 0:
        sys.exit(f"error: no Python sources found under {root}")
    print(
        f"\r  {docs} documents, {written / 1e6:.1f} MB from {root} in {time.time() - start:.1f}s -> {args.output}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
