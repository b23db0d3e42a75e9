"""Reading checkpoints: find, verify, read the model description and the weights.

What inference, conversion, the server and training's resume need from a checkpoint (layout
in this package's __init__), without the training code. Loading is strict except for
`_extra_state` entries (Transformer Engine keeps them where local modules do not). Every
pickle in a checkpoint is read through safe_pickle.py's allow-lists: no code in a
checkpoint runs on load.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Dict, List, Optional, Tuple

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

from megatron.early_exit.checkpoint.checksums import checksum_problems
from megatron.early_exit.checkpoint.errors import CheckpointError, cause_of_kind, one_line
from megatron.early_exit.checkpoint.safe_pickle import (
    check_extra_states,
    read_checked,
    read_index,
    safe_dcp_reading,
    torch_load,
)
from megatron.early_exit.models.model_config import ModelConfig, padded_vocab_size

TRACKER = "latest_checkpointed_iteration.txt"
# One key per layer (global number) rather than a stacked tensor of all layers.
MODEL_METADATA = {"non_homogeneous_layers": True}


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def unwrap(model):
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def model_sharded_state(model) -> dict:
    """The model's sharded state dict in the checkpoint's key layout (for readers and writers)."""
    return unwrap(model).sharded_state_dict(metadata=dict(MODEL_METADATA))


def latest_iteration(root: str) -> int:
    marker = os.path.join(root, TRACKER)
    if not os.path.isfile(marker):
        raise CheckpointError(f"--load {root}: no {TRACKER} (not a checkpoint directory, or no save finished)")
    text = open(marker).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"--load {root}: {marker} is corrupt ({text!r})")
    return int(text)


def resolve(root: str, iteration: Optional[int] = None, checksums: bool = True) -> str:
    """The directory of the latest (or the given) checkpoint under `root`, verified complete
    (and, unless `checksums` is False, undamaged)."""
    chosen = iteration is not None
    if not chosen:
        iteration = latest_iteration(root)
    path = checkpoint_dir(root, iteration)
    if not os.path.isdir(path) and os.path.isdir(path + ".old"):
        path += ".old"  # a re-save of this iteration was killed between its two renames
    if not os.path.isdir(path):
        if chosen:
            present = ", ".join(map(str, iterations_present(root))) or "none"
            raise CheckpointError(
                f"--load-iteration {iteration}: no checkpoint of that iteration under --load {root} "
                f"(iterations present: {present})"
            )
        raise CheckpointError(f"--load {root}: {path} named by {TRACKER} does not exist")
    verify(path, checksums)
    return path


def iterations_present(root: str) -> List[int]:
    """Iterations of the finished checkpoints under `root` (not those still being written)."""
    found = set()
    for name in os.listdir(root) if os.path.isdir(root) else ():
        match = re.fullmatch(r"iter_(\d{7,})(\.old)?", name)
        if match and os.path.isdir(os.path.join(root, name)):
            found.add(int(match.group(1)))
    return sorted(found)


def verify(path: str, checksums: bool = True) -> None:
    """Every file the checkpoint's index names exists and is long enough, and every file its
    manifest names has the size and CRC-32 it was written with (checkpoints written before
    the manifest skip that); errors name the file."""
    for name in ("metadata.json", "common.pt", ".metadata"):
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(
                f"checkpoint file {os.path.join(path, name)} is missing (incomplete or damaged checkpoint)"
            )
    problems = checksum_problems(path, with_crc=checksums)
    if problems:
        raise CheckpointError(problems[0])
    index = read_index(path)
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


# -- the model description ---------------------------------------------------------------


class _SafeCommonLoadStrategy(TorchCommonLoadStrategy):
    """megatron-core's common.pt reader, through torch's weights_only loader."""

    def load_common(self, checkpoint_dir):
        return read_common(str(checkpoint_dir))


def read_common(path: str) -> dict:
    """The checkpoint's non-tensor state: args, iteration, layout, ..."""
    source = os.path.join(path, "common.pt")
    return read_checked(source, lambda: torch_load(source, source), dict, "a dict", "cannot be read")


def read_args(root: str, iteration: Optional[int] = None) -> dict:
    """The flags stored with the latest (or the given) checkpoint under `root` (for
    --use-checkpoint-args), its tokenizer files found where the checkpoint is now (it may
    have been moved)."""
    path = resolve(root, iteration, checksums=False)  # the load reads the checksums
    flags = dict(read_common(path)["args"])
    flags.update(read_model_config(path).tokenizer.to_flags())
    return flags


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
    return dataclasses.replace(config, tokenizer=config.tokenizer.resolved(root))


def _model_config_from_flags(saved: dict) -> ModelConfig:
    """Stored training flags -> ModelConfig (their padded vocabulary, else the tokenizer's
    padded as the training layout did)."""
    vocab = saved.get("padded_vocab_size")
    if not vocab:
        tokenizer = ModelConfig.from_flags(saved, padded_vocab_size=1).tokenizer.build()
        vocab = padded_vocab_size(
            tokenizer.vocab_size,
            saved.get("make_vocab_size_divisible_by", 128),
            saved.get("tensor_model_parallel_size", 1),
        )
    return ModelConfig.from_flags(saved, padded_vocab_size=vocab)


# -- weights ---------------------------------------------------------------------------


def model_state_to_read(model, skip_exits) -> Tuple[dict, dict, tuple]:
    """(full sharded model state, the part to read, prefixes of exits not to read)."""
    full = model_sharded_state(model)
    skipped = tuple(f"exits.{n}." for n in skip_exits)
    return full, {k: v for k, v in full.items() if not k.startswith(skipped)}, skipped


def _is_extra_state(key: str) -> bool:
    return key.endswith("_extra_state")


def apply_model_state(model, loaded: dict, skipped: tuple, path: str) -> None:
    """Strict, except for `_extra_state` (as Megatron-LM): Transformer Engine keeps it in
    modules whose sharded state dict leaves it out (core attention), and a checkpoint
    from another layout may lack it."""
    result = unwrap(model).load_state_dict(loaded, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(skipped) and not _is_extra_state(k)]
    if missing:
        raise CheckpointError(f"{path}: no weights for {missing}")
    unexpected = [k for k in result.unexpected_keys if not _is_extra_state(k)]
    if unexpected:
        raise CheckpointError(f"{path}: the model has no place for {unexpected}")


def load_weights(path: str, model, skip_exits: Tuple[int, ...] = ()) -> None:
    """Read the model's weights (any layout) from a checkpoint directory; exits in
    `skip_exits` are not in the checkpoint and keep their values."""
    _, state, skipped = model_state_to_read(model, skip_exits)
    apply_model_state(model, read_sharded({"model": state}, path)["model"], skipped, path)


def read_sharded(state: dict, path: str, flag: str = "--load") -> dict:
    """dist_checkpointing.load, every failure as one CheckpointError line naming `flag`
    (the option that gave the checkpoint). Entries the checkpoint lacks are refused by
    name, except `_extra_state` ones (Transformer Engine modules hold them where local
    ones do not): those are left out of the load."""
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with safe_dcp_reading(path):
            loaded, _, absent = dist_checkpointing.load(
                state,
                path,
                sharded_strategy=TorchDistLoadShardedStrategy(),
                common_strategy=_SafeCommonLoadStrategy(),
                strict=StrictHandling.RETURN_UNEXPECTED,
            )
        check_extra_states(loaded, path)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as err:  # torch's CheckpointException is a BaseException
        cause = cause_of_kind(err, CheckpointError)
        if cause is not None:
            raise cause from None
        raise CheckpointError(f"{flag} {path}: {one_line(err)}") from err
    absent = sorted(k for k in absent if not _is_extra_state(k))
    if absent:
        raise CheckpointError(
            f"{flag} {path}: the checkpoint has no {', '.join(absent[:5])}"
            + (f" (and {len(absent) - 5} more)" if len(absent) > 5 else "")
        )
    return loaded
