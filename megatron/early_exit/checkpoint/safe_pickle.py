"""A checkpoint's pickles, read without running code.

Three parts of a checkpoint are pickles, which can call any function: torch DCP's index
`.metadata` (torch reads it with plain `pickle.load`), the byte items in the shards (RNG
states, `_extra_state`: torch reads them with `torch.load(weights_only=False)`, and
Transformer Engine unpickles its `_extra_state` bytes once more) and `common.pt`. Every
read here takes them through an allow-list of the types these files hold (`_INDEX_TYPES`,
torch's `weights_only` loader, `_EXTRA_STATE_TYPES`), and refuses anything else by name
before it is called.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import threading
from typing import Dict

import torch

from megatron.early_exit.checkpoint.errors import CheckpointError, UnsafeCheckpointError, one_line

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
        raise CheckpointError(f"checkpoint file {source} cannot be read safely ({one_line(err)})") from None


def read_index(path: str):
    """torch DCP's index (`.metadata`) of the checkpoint at `path`, through `_INDEX_TYPES`."""
    from torch.distributed.checkpoint.metadata import Metadata

    source = os.path.join(path, ".metadata")

    def read():
        with open(source, "rb") as f:
            return _RestrictedUnpickler(f, source, _INDEX_TYPES).load()

    return read_checked(source, read, Metadata, "an index", "is corrupt")


def read_checked(source: str, read, kind: type, what: str, failure: str):
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
def safe_dcp_reading(path: str):
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


def check_extra_states(tree, path: str, key: str = "") -> None:
    """Transformer Engine unpickles its `_extra_state` bytes with plain pickle when they are
    loaded into a module: unpickle them here first, through `_EXTRA_STATE_TYPES` (the real
    load then meets only those types)."""
    if isinstance(tree, dict):
        for name, value in tree.items():
            check_extra_states(value, path, str(name))
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
