"""A generated text corpus and the preprocessing tool's calls, shared by the tokenizer and
input tests. Tokenizer files are made from the corpus with the same libraries users train
with, so the tests need no download.
"""

import importlib.util
import json
import os
import random
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "preprocess_data.py")

WORDS = (
    "the quick brown fox jumps over lazy dog early exit layer token model data train "
    "pipeline tensor parallel über naïve café 数据 42 3.14"
).split()

# Text with what tokenizers tend to lose: repeated spaces, a newline, a tab, characters
# never seen in training, and an emoji.
HARD_TEXT = "the  quick fox\njumps\tover ZZZ qqq \u00e9t\u00e9 \U0001f389 end"


def sentences(n: int, seed: int = 0) -> list[str]:
    """Sentences of WORDS and of made-up words (enough distinct pieces to fill a vocabulary)."""
    rng = random.Random(seed)
    made_up = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(300)]
    words = WORDS * 10 + made_up
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 16))) for _ in range(n)]


def load_preprocess_tool():
    spec = importlib.util.spec_from_file_location("preprocess_data_tool", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return str(path)


def run_preprocess_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def documents(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]
