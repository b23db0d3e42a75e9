"""Reading checkpoints: find, verify, read the model description and the weights.

What inference, conversion and the server need from a checkpoint written by
training/checkpointing.py (layout below), without the training code:
    DIR/iter_0000100/                       one complete checkpoint (sharded tensors + common.pt)
    DIR/latest_checkpointed_iteration.txt   the latest complete one, written last

Tensor keys use global layer numbers and exits are keyed by their layer, so weights
load into any TP/PP layout. Loading is strict except for `_extra_state` entries
(Transformer Engine keeps them where local modules do not).
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple


from megatron.core import dist_checkpointing

from megatron.early_exit.errors import EarlyExitError
from megatron.early_exit.models.model_config import ModelConfig, padded_vocab_size

TRACKER = "latest_checkpointed_iteration.txt"
# One key per layer (global number) rather than a stacked tensor of all layers.
MODEL_METADATA = {"non_homogeneous_layers": True}


class CheckpointError(EarlyExitError):
    """A checkpoint that is missing, incomplete, or does not match the model."""


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def model_sharded_state(model) -> dict:
    """The model's sharded state dict in this module's key layout (also for readers)."""
    return _unwrap(model).sharded_state_dict(metadata=dict(MODEL_METADATA))

def latest_iteration(root: str) -> int:
    marker = os.path.join(root, TRACKER)
    if not os.path.isfile(marker):
        raise CheckpointError(f"--load {root}: no {TRACKER} (not a checkpoint directory, or no save finished)")
    text = open(marker).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"--load {root}: {marker} is corrupt ({text!r})")
    return int(text)


def resolve(root: str, iteration: Optional[int] = None) -> str:
    """The directory of the latest (or the given) checkpoint under `root`, verified complete."""
    if iteration is None:
        iteration = latest_iteration(root)
    path = checkpoint_dir(root, iteration)
    if not os.path.isdir(path) and os.path.isdir(path + ".old"):
        path += ".old"  # a re-save of this iteration was killed between its two renames
    if not os.path.isdir(path):
        raise CheckpointError(f"--load {root}: {path} named by {TRACKER} does not exist")
    verify(path)
    return path


def verify(path: str) -> None:
    """Every file the checkpoint's index names exists and is long enough; errors name the file."""
    from torch.distributed.checkpoint import FileSystemReader

    for name in ("metadata.json", "common.pt", ".metadata"):
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(f"checkpoint file {os.path.join(path, name)} is missing (incomplete or damaged checkpoint)")
    try:
        index = FileSystemReader(path).read_metadata()
    except Exception as err:
        raise CheckpointError(f"checkpoint file {os.path.join(path, '.metadata')} is corrupt ({type(err).__name__})") from err
    needed: Dict[str, int] = {}
    for info in index.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for rel, end in sorted(needed.items()):
        shard = os.path.join(path, rel)
        if not os.path.isfile(shard):
            raise CheckpointError(f"checkpoint shard {shard} is missing")
        size = os.path.getsize(shard)
        if size < end:
            raise CheckpointError(f"checkpoint shard {shard} is truncated ({size} bytes, the index needs {end})")


def read_common(path: str) -> dict:
    """The checkpoint's non-tensor state: args, iteration, layout, ..."""
    try:
        return dist_checkpointing.load_common_state_dict(path)
    except Exception as err:
        raise CheckpointError(f"checkpoint file {os.path.join(path, 'common.pt')} cannot be read ({type(err).__name__})") from err

def _model_state(model, skip_exits) -> Tuple[dict, dict, tuple]:
    """(full sharded model state, the part to read, prefixes of exits not to read)."""
    full = model_sharded_state(model)
    skipped = tuple(f"exits.{n}." for n in skip_exits)
    return full, {k: v for k, v in full.items() if not k.startswith(skipped)}, skipped


def _is_extra_state(key: str) -> bool:
    return key.endswith("_extra_state")


def _apply_model_state(model, loaded: dict, skipped: tuple, path: str) -> None:
    """Strict, except for `_extra_state` (as Megatron-LM): Transformer Engine keeps it in
    modules whose sharded state dict leaves it out (core attention), and a checkpoint
    from another layout may lack it."""
    result = _unwrap(model).load_state_dict(loaded, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(skipped) and not _is_extra_state(k)]
    if missing:
        raise CheckpointError(f"{path}: no weights for {missing}")
    unexpected = [k for k in result.unexpected_keys if not _is_extra_state(k)]
    if unexpected:
        raise CheckpointError(f"{path}: the model has no place for {unexpected}")


def load_weights(path: str, model, skip_exits: Tuple[int, ...] = ()) -> None:
    """Read the model's weights (any layout) from a checkpoint directory; exits in
    `skip_exits` are not in the checkpoint and keep their values."""
    _, state, skipped = _model_state(model, skip_exits)
    _apply_model_state(model, _load({"model": state}, path)["model"], skipped, path)


def _load(state: dict, path: str, flag: str = "--load") -> dict:
    """dist_checkpointing.load, every failure as one CheckpointError line naming `flag`
    (the option that gave the checkpoint). Entries the checkpoint lacks are refused by
    name, except `_extra_state` ones (Transformer Engine modules hold them where local
    ones do not): those are left out of the load."""
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron.core.dist_checkpointing.validation import StrictHandling

    try:
        loaded, _, absent = dist_checkpointing.load(state, path, strict=StrictHandling.RETURN_UNEXPECTED)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as err:  # torch's CheckpointException is a BaseException
        raise CheckpointError(f"{flag} {path}: {_one_line(err)}") from err
    absent = sorted(k for k in absent if not _is_extra_state(k))
    if absent:
        raise CheckpointError(f"{flag} {path}: the checkpoint has no {', '.join(absent[:5])}"
                              + (f" (and {len(absent) - 5} more)" if len(absent) > 5 else ""))
    return loaded


read_sharded = _load  # for readers of parts of a checkpoint (hf/add_exits.py)


def _one_line(err: BaseException, limit: int = 300) -> str:
    """`Type: first line` of an error; for torch's CheckpointException, of the first
    rank's underlying error (its own text is a multi-rank traceback)."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        cause = next(iter(failures.values()))
        err = cause[0] if isinstance(cause, tuple) else cause
    first = str(err).splitlines()[0] if str(err) else ""
    if len(first) > limit:
        first = first[:limit] + " ..."
    return f"{type(err).__name__}: {first}"


def read_model_config(path: str) -> ModelConfig:
    """The model description of the checkpoint at `path` (an iter_* directory), its
    tokenizer files resolved against the checkpoint root. Checkpoints written before
    the description was stored have it rebuilt from their stored flags."""
    common = read_common(path)
    root = os.path.dirname(os.path.abspath(path))
    if "model_config" in common:
        config = ModelConfig.from_dict(common["model_config"])
    else:
        config = _model_config_from_flags(common["args"])
    return ModelConfig.from_dict({**config.to_dict(), "tokenizer": vars(config.tokenizer.resolved(root))})


def _model_config_from_flags(saved: dict) -> ModelConfig:
    """Stored training flags -> ModelConfig (their padded vocabulary, else the tokenizer's
    padded as the training layout did)."""
    vocab = saved.get("padded_vocab_size")
    if not vocab:
        tokenizer = ModelConfig.from_flags(saved, padded_vocab_size=1).tokenizer.build()
        vocab = padded_vocab_size(tokenizer.vocab_size, saved.get("make_vocab_size_divisible_by", 128),
                                  saved.get("tensor_model_parallel_size", 1))
    return ModelConfig.from_flags(saved, padded_vocab_size=vocab)

