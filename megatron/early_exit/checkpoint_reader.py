"""Reading checkpoints: find, verify, read the model description and the weights.

What inference, conversion and the server need from a checkpoint written by
training/checkpointing.py (layout below), without the training code:
    DIR/iter_0000100/                       one complete checkpoint (sharded tensors + common.pt)
    DIR/latest_checkpointed_iteration.txt   the latest complete one, written last

    DIR/iter_0000100/checksums.json         CRC-32 and size of every file of it (older checkpoints lack it)

Tensor keys use global layer numbers and exits are keyed by their layer, so weights
load into any TP/PP layout. Loading is strict except for `_extra_state` entries
(Transformer Engine keeps them where local modules do not).

No code in a checkpoint runs on load. Three parts of it are pickles, which can call any
function: torch DCP's index `.metadata` (torch reads it with plain `pickle.load`), the byte
items in the shards (RNG states, `_extra_state`: torch reads them with
`torch.load(weights_only=False)`, and Transformer Engine unpickles its `_extra_state` bytes
once more) and `common.pt`. Every read here takes them through an allow-list of the types
these files hold (`_INDEX_TYPES`, torch's `weights_only` loader, `_EXTRA_STATE_TYPES`), and
refuses anything else by name before it is called.
"""

from __future__ import annotations

import contextlib
import dataclasses
import filecmp
import io
import json
import os
import pickle
import re
import threading
import zlib
from typing import Dict, List, Optional, Tuple

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

from megatron.early_exit.config import EarlyExitConfig
from megatron.early_exit.errors import EarlyExitError
from megatron.early_exit.models.model_config import ModelConfig, padded_vocab_size

TRACKER = "latest_checkpointed_iteration.txt"
MANIFEST = "checksums.json"  # {"format": "crc32", "files": {name: [size, crc32 hex]}}
# One key per layer (global number) rather than a stacked tensor of all layers.
MODEL_METADATA = {"non_homogeneous_layers": True}


class CheckpointError(EarlyExitError):
    """A checkpoint that is missing, incomplete, or does not match the model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file names a function or class no checkpoint holds (it could run code)."""

    def __init__(self, source: str, name: str):
        super().__init__(
            f"checkpoint file {source}: refuses to load {name} (a checkpoint never holds it; it could run code)"
        )
        self.source, self.name = source, name

    def __reduce__(self):  # torch DCP gathers failures across ranks
        return type(self), (self.source, self.name)


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


# -- checksums ------------------------------------------------------------------------


def file_checksum(path: str, chunk: int = 16 << 20) -> str:
    """CRC-32 of a file (zlib's, about 3.5 GB/s on one core), as 8 hex digits."""
    crc, buffer = 0, bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buffer)
            if not n:
                return f"{crc:08x}"
            crc = zlib.crc32(view[:n], crc)


def read_manifest(path: str) -> Optional[Dict[str, list]]:
    """{file name: [size, crc32]} of the checkpoint at `path`; None if it has no manifest."""
    source = os.path.join(path, MANIFEST)
    if not os.path.isfile(source):
        return None
    try:
        manifest = json.load(open(source))
        files = manifest["files"]
        if manifest.get("format") != "crc32" or not all(isinstance(v, list) and len(v) == 2 for v in files.values()):
            raise ValueError("unknown layout")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"checkpoint file {source} is corrupt ({type(err).__name__})") from err
    return files


def _describe(path: str, name: str) -> str:
    kind = "shard" if name.endswith(".distcp") else "file"
    return f"checkpoint {kind} {os.path.join(path, name)}"


def split_by_size(files: Dict[str, list], parts: int) -> List[List[str]]:
    """File names in `parts` groups of about equal bytes (the same on every rank)."""
    groups, loads = [[] for _ in range(parts)], [0] * parts
    for name in sorted(files, key=lambda n: (-files[n][0], n)):
        least = loads.index(min(loads))
        groups[least].append(name)
        loads[least] += files[name][0]
    return groups


def checksum_problems(path: str, part: Tuple[int, int] = (0, 1), with_crc: bool = True) -> List[str]:
    """What is wrong with the files the manifest names (every size; the CRC-32 of this
    part's share, `part` = (index, number of parts)); [] when nothing or no manifest."""
    files = read_manifest(path)
    if files is None:
        return []
    problems = []
    for name, (size, _) in sorted(files.items()):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            problems.append(f"{_describe(path, name)} is missing")
        elif os.path.getsize(full) != size:
            have = os.path.getsize(full)
            problems.append(
                f"{_describe(path, name)} is truncated ({have} bytes, {size} written)"
                if have < size
                else f"{_describe(path, name)}: {have} bytes, {size} written (damaged)"
            )
    if problems or not with_crc:
        return problems
    for name in split_by_size(files, part[1])[part[0]]:
        if file_checksum(os.path.join(path, name)) != files[name][1]:
            problems.append(f"{_describe(path, name)}: checksum mismatch (damaged)")
    return problems


# -- reading pickles without running code ----------------------------------------------

_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}
# What torch DCP's index holds: its metadata dataclasses (and the save plans megatron-core
# keeps in it), torch.Size, dtypes and layouts; megatron-core's classes of older checkpoints.
_INDEX_TYPES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "StorageMeta",
        "MetadataIndex",
        "ChunkStorageMetadata",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.planner": {
        "SavePlan",
        "WriteItem",
        "WriteItemType",
        "TensorWriteData",
        "BytesIOWriteData",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "megatron.core.dist_checkpointing.strategies.torch": {"MCoreMetadata", "MCoreSavePlan"},
    "torch": {"Size", *_DTYPES},
    "torch.serialization": {"_get_layout"},
    "collections": {"OrderedDict"},
}
# What Transformer Engine pickles into `_extra_state` (and unpickles with plain pickle):
# dicts, numbers, strings and CPU tensors (their storages as nested torch.save bytes).
_EXTRA_STATE_TYPES = {
    "collections": {"OrderedDict"},
    "torch._utils": {"_rebuild_tensor_v2"},
    "torch": {"Size", *_DTYPES},
    "torch.storage": {"_load_from_bytes"},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """pickle with a find_class allow-list: any other global is refused by name, never
    imported or called."""

    def __init__(self, file, source: str, allowed: Dict[str, set]):
        super().__init__(file)
        self.source, self.allowed = source, allowed

    def find_class(self, module, name):
        if name not in self.allowed.get(module, ()):
            raise UnsafeCheckpointError(self.source, f"{module}.{name}")
        if (module, name) == ("torch.storage", "_load_from_bytes"):  # torch.load(weights_only=False) of nested bytes
            return lambda data: torch_load(io.BytesIO(data), self.source)
        return super().find_class(module, name)


def torch_load(file, source: str, map_location="cpu"):
    """torch.load with torch's weights_only allow-list (tensors, dtypes, containers,
    primitives); a refused global is named."""
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        name = re.search(r"GLOBAL (\S+)", str(err))
        if name:
            name = name.group(1).rstrip(".")
            raise UnsafeCheckpointError(
                source, name if "." in name else f"builtins.{name}"
            ) from None  # torch drops builtins.
        raise CheckpointError(f"checkpoint file {source} cannot be read safely ({_one_line(err)})") from None


def read_index(path: str):
    """torch DCP's index (`.metadata`) of the checkpoint at `path`, through `_INDEX_TYPES`."""
    from torch.distributed.checkpoint.metadata import Metadata

    source = os.path.join(path, ".metadata")

    def read():
        with open(source, "rb") as f:
            return _RestrictedUnpickler(f, source, _INDEX_TYPES).load()

    return _read_checked(source, read, Metadata, "an index", "is corrupt")


def _read_checked(source: str, read, kind: type, what: str, failure: str):
    """`read()`, every failure one CheckpointError naming `source`, and of type `kind`."""
    try:
        value = read()
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"checkpoint file {source} {failure} ({type(err).__name__})") from err
    if not isinstance(value, kind):
        raise CheckpointError(f"checkpoint file {source} is corrupt (it holds a {type(value).__name__}, not {what})")
    return value


_PATCHING = threading.RLock()


@contextlib.contextmanager
def _safe_dcp_reading(path: str):
    """While dist_checkpointing reads the checkpoint at `path`: torch DCP's index through
    `_INDEX_TYPES` and its byte items through torch's weights_only loader, instead of
    pickle.load and torch.load(weights_only=False) (FileSystemReader.read_metadata and
    DefaultLoadPlanner.load_bytes, which megatron-core's reader and planner inherit)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta

    def read_metadata(reader, *args, **kwargs):
        source = str(reader._get_metadata_path(kwargs.get("rank")))
        with reader.fs.create_stream(source, "rb") as f:
            index = _RestrictedUnpickler(f, source, _INDEX_TYPES).load()
        if getattr(index, "storage_meta", None) is None:
            index.storage_meta = StorageMeta()
        index.storage_meta.load_id = reader.load_id
        return index

    def load_bytes(planner, read_item, value):
        fqn = read_item.dest_index.fqn
        info = planner.metadata.storage_data.get(read_item.storage_index)
        loaded = torch_load(
            value, f"{os.path.join(path, info.relative_path if info else '')} (item {fqn})", map_location=None
        )
        if planner.flatten_state_dict:
            set_element(planner.original_state_dict, planner.mappings[fqn], loaded)
        else:
            planner.state_dict[fqn] = loaded

    with _PATCHING:
        original = FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes
        FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes = read_metadata, load_bytes
        try:
            yield
        finally:
            FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes = original


def _check_extra_states(tree, path: str, key: str = "") -> None:
    """Transformer Engine unpickles its `_extra_state` bytes with plain pickle when they are
    loaded into a module: unpickle them here first, through `_EXTRA_STATE_TYPES` (the real
    load then meets only those types)."""
    if isinstance(tree, dict):
        for name, value in tree.items():
            _check_extra_states(value, path, str(name))
        return
    if not key.endswith("_extra_state"):
        return
    source = f"{path} (item {key})"
    if isinstance(tree, torch.Tensor) and tree.dtype == torch.uint8 and tree.numel():
        try:
            _RestrictedUnpickler(io.BytesIO(tree.detach().cpu().numpy().tobytes()), source, _EXTRA_STATE_TYPES).load()
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(
                f"checkpoint file {source}: its Transformer Engine state is not readable safely ({type(err).__name__})"
            ) from err
    elif isinstance(tree, io.BytesIO):  # Transformer Engine's older format: torch.load of the bytes
        torch_load(io.BytesIO(tree.getvalue()), source)


class _SafeCommonLoadStrategy(TorchCommonLoadStrategy):
    """megatron-core's common.pt reader, through torch's weights_only loader."""

    def load_common(self, checkpoint_dir):
        return read_common(str(checkpoint_dir))


def read_common(path: str) -> dict:
    """The checkpoint's non-tensor state: args, iteration, layout, ..."""
    source = os.path.join(path, "common.pt")
    return _read_checked(source, lambda: torch_load(source, source), dict, "a dict", "cannot be read")


def read_args(root: str, iteration: Optional[int] = None) -> dict:
    """The flags stored with the latest (or the given) checkpoint under `root` (for
    --use-checkpoint-args), its tokenizer files found where the checkpoint is now (it may
    have been moved)."""
    path = resolve(root, iteration, checksums=False)  # the load reads the checksums
    flags = dict(read_common(path)["args"])
    tokenizer = read_model_config(path).tokenizer
    flags.update(
        tokenizer_type=tokenizer.type,
        tokenizer_model=tokenizer.model,
        vocab_file=tokenizer.vocab_file,
        merge_file=tokenizer.merge_file,
        vocab_size=tokenizer.vocab_size,
    )
    return flags


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
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _safe_dcp_reading(path):
            loaded, _, absent = dist_checkpointing.load(
                state,
                path,
                sharded_strategy=TorchDistLoadShardedStrategy(),
                common_strategy=_SafeCommonLoadStrategy(),
                strict=StrictHandling.RETURN_UNEXPECTED,
            )
        _check_extra_states(loaded, path)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as err:  # torch's CheckpointException is a BaseException
        cause = _cause_of_kind(err, CheckpointError)
        if cause is not None:
            raise cause from None
        raise CheckpointError(f"{flag} {path}: {_one_line(err)}") from err
    absent = sorted(k for k in absent if not _is_extra_state(k))
    if absent:
        raise CheckpointError(
            f"{flag} {path}: the checkpoint has no {', '.join(absent[:5])}"
            + (f" (and {len(absent) - 5} more)" if len(absent) > 5 else "")
        )
    return loaded


read_sharded = _load  # for readers of parts of a checkpoint (hf/add_exits.py)


def _cause_of_kind(err: BaseException, kind, depth: int = 8):
    """The first exception of `kind` behind `err` (its chain of causes, and the
    per-rank failures torch's CheckpointException holds); None if there is none."""
    for _ in range(depth):
        if err is None or isinstance(err, kind):
            return err
        failures = getattr(err, "failures", None)
        if isinstance(failures, dict):
            for failure in failures.values():
                found = _cause_of_kind(failure[0] if isinstance(failure, tuple) else failure, kind, depth - 1)
                if found is not None:
                    return found
        err = err.__cause__  # what raised it (`raise ... from`), not what was being handled
    return None


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


# -- the checkpoint against a model ----------------------------------------------------

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
