"""Whether a checkpoint's weights fit the model the flags build: every difference of
architecture, exit structure and tokenizer listed by flag, before any tensor is read."""

from __future__ import annotations

import filecmp
import os
from typing import List, Optional

from megatron.early_exit.checkpoint.errors import CheckpointError
from megatron.early_exit.config import EarlyExitConfig

# What an architecture difference line's flag is made of, where that is not obvious.
_HINTS = {
    "--padded-vocab-size": " (the tokenizer's vocabulary padded to a multiple of --make-vocab-size-divisible-by x TP)",
    "--max-position-embeddings": " (the learned position embeddings; it defaults to --seq-length)",
}
_STRUCTURE_FLAGS = {"--" + k.replace("_", "-") for k in EarlyExitConfig.STRUCTURE_FIELDS}
# The files of a Hugging Face tokenizer directory that decide its vocabulary.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "added_tokens.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
)


def compare_with_checkpoint(stored, now) -> List[int]:
    """Raise if the model the flags build (ModelConfig `now`) cannot take the weights of a
    checkpoint described by `stored`, listing every difference (architecture, exit
    structure, tokenizer). Returns the exits the model has and the checkpoint lacks (they
    keep their fresh initialisation)."""
    saved_exits, exits = stored.exit_layer_nums, now.exit_layer_nums
    shared = set(saved_exits) & set(exits)
    problems = []
    for line in stored.architecture_differences(now):
        flag = line.split(":", 1)[0]
        if flag in _STRUCTURE_FLAGS and not shared:
            continue  # every exit of the model is new: their structure is free
        problems.append(line + _HINTS.get(flag, ""))
    missing_in_model = sorted(set(saved_exits) - set(exits))
    if missing_in_model:
        problems.append(
            f"--exit-layer-nums: the checkpoint has exits at layers {missing_in_model} that this model lacks "
            f"(checkpoint {saved_exits}, now {exits})"
        )
    problems += _tokenizer_differences(stored.tokenizer, now.tokenizer)
    if problems:
        raise CheckpointError("the checkpoint does not match this model:\n  " + "\n  ".join(problems))
    return sorted(set(exits) - set(saved_exits))


# Types that give the same ids over the same files (Llama 2's adds a BOS to every text):
# a converted Llama 2 checkpoint stores SentencePieceTokenizer, EE-LLM's scripts pass Llama2Tokenizer.
_SAME_IDS = {frozenset(("SentencePieceTokenizer", "Llama2Tokenizer"))}


def _tokenizer_differences(stored, now) -> List[str]:
    """Another tokenizer type, NullTokenizer size, or tokenizer files of other contents."""
    from megatron.early_exit.tokenizers import NullTokenizer

    if stored.type is None:  # written without a tokenizer of its own
        return []
    if stored.type != now.type and frozenset((stored.type, now.type)) not in _SAME_IDS:
        return [f"--tokenizer-type: checkpoint {stored.type}, now {now.type}"]
    if stored.type == NullTokenizer.type_name:
        return (
            []
            if stored.vocab_size == now.vocab_size
            else [
                f"--vocab-size: checkpoint {stored.vocab_size}, now {now.vocab_size} (the NullTokenizer's vocabulary)"
            ]
        )
    return [
        f"{flag}: checkpoint {getattr(stored, key)}, now {getattr(now, key)} (other contents)"
        for key, flag in (
            ("model", "--tokenizer-model"),
            ("vocab_file", "--vocab-file"),
            ("merge_file", "--merge-file"),
        )
        if not _same_contents(getattr(stored, key), getattr(now, key))
    ]


def _same_contents(a: Optional[str], b: Optional[str]) -> bool:
    """Whether two tokenizer files (or directories) hold the same vocabulary; True where
    it cannot be told (a file not given, or no longer there)."""
    if not a or not b:
        return True
    a, b = os.path.realpath(a), os.path.realpath(b)
    if a == b or not (os.path.exists(a) and os.path.exists(b)):
        return True
    if os.path.isfile(a) and os.path.isfile(b):
        return filecmp.cmp(a, b, shallow=False)
    if os.path.isdir(a) and os.path.isdir(b):
        names = [
            n for n in _TOKENIZER_FILES if os.path.isfile(os.path.join(a, n)) or os.path.isfile(os.path.join(b, n))
        ]
        return all(
            _same_contents(os.path.join(a, n), os.path.join(b, n))
            and os.path.isfile(os.path.join(a, n)) == os.path.isfile(os.path.join(b, n))
            for n in names
        )
    return False
