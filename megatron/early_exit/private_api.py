"""Every private name of megatron-core, PyTorch and other dependencies that this package
touches, in one place, with the versions it was checked against.

Each entry says where we use it and why no public API does the job. A dependency upgrade
that moves one of them fails tests/test_private_api.py by name (`missing()`), instead of
failing somewhere deep in a run; that test also fails when the package starts using a
private attribute that is not listed here. Names a checkpoint's pickles may hold (the safe
unpickler's allow-list) are listed too: a moved one would refuse every checkpoint.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

CHECKED_AGAINST = {"megatron-core": "0.16.1", "torch": "2.13.0", "numpy": "2"}


@dataclass(frozen=True)
class PrivateUse:
    module: str  # importable module that holds it
    path: str  # attribute path in the module ("Class.attribute")
    used_in: Tuple[str, ...]  # our files, relative to megatron/early_exit
    why: str  # what it does for us that no public API does
    instance: Optional[Callable[[], object]] = None  # for an attribute set on instances: makes one

    @property
    def name(self) -> str:
        return f"{self.module}.{self.path}"


def _timers():
    from megatron.core.timers import Timers

    return Timers(0, "max")


def _parser():
    import argparse

    return argparse.ArgumentParser()


def _tensor():
    import torch

    return torch.zeros(1)


MEGATRON_CORE = (
    PrivateUse(
        "megatron.core.transformer.transformer_layer",
        "TransformerLayer._forward_attention",
        ("models/early_exit_gpt.py",),
        "the layer loop runs the attention and MLP halves of a layer apart: an exit MLP head reads the "
        "state between them, and training and decoding stop at an exit; forward() runs both",
    ),
    PrivateUse(
        "megatron.core.transformer.transformer_layer",
        "TransformerLayer._forward_mlp",
        ("models/early_exit_gpt.py", "inference/layers.py"),
        "the MLP half of a layer, after the decoder's own cached attention",
    ),
    PrivateUse(
        "megatron.core.models.common.embeddings.rope_utils",
        "_rotate_half",
        ("inference/layers.py",),
        "rotary embedding with cos/sin precomputed for cached positions (apply_rotary_pos_emb recomputes "
        "them from the frequencies at every call)",
    ),
    PrivateUse(
        "megatron.core.dist_checkpointing.strategies.filesystem_async",
        "_get_write_results_queue",
        ("checkpoint/writer.py",),
        "saving without the writer process that the async strategy spawns (it re-imports __main__)",
    ),
    PrivateUse(
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer._set_main_param_and_optimizer_states",
        ("training/checkpointing.py",),
        "loading a distributed optimizer's state into parameters whose exits changed",
    ),
    PrivateUse(
        "megatron.core.timers",
        "Timers._log_level",
        ("training/timers.py",),
        "whether a timer of a given level is recorded (Timers keeps the level to itself)",
        _timers,
    ),
    PrivateUse(
        "megatron.core.tensor_parallel.random",
        "_CUDA_RNG_STATE_TRACKER",
        ("platform.py",),
        "CPU adapter: the RNG tracker is rebuilt on the CPU generator",
    ),
    PrivateUse(
        "megatron.core.tensor_parallel.random",
        "_CUDA_RNG_STATE_TRACKER_INITIALIZED",
        ("platform.py",),
        "CPU adapter: the RNG tracker is rebuilt on the CPU generator",
    ),
    PrivateUse(
        "megatron.core.tensor_parallel.random",
        "_get_cuda_rng_state",
        ("platform.py",),
        "CPU adapter: the tracker's state functions read the CPU generator",
    ),
    PrivateUse(
        "megatron.core.tensor_parallel.random",
        "_set_cuda_rng_state",
        ("platform.py",),
        "CPU adapter: the tracker's state functions set the CPU generator",
    ),
)

TORCH = (
    PrivateUse(
        "torch.distributed.distributed_c10d",
        "_world.pg_map",
        ("parallel.py",),
        "every process group, to free megatron-core's before a re-initialisation (no public listing)",
    ),
    PrivateUse(
        "torch.distributed.checkpoint._traverse",
        "set_element",
        ("checkpoint/safe_pickle.py",),
        "the safe reader puts byte items where DefaultLoadPlanner.load_bytes would",
    ),
    PrivateUse(
        "torch.distributed.checkpoint",
        "FileSystemReader._get_metadata_path",
        ("checkpoint/safe_pickle.py",),
        "the safe reader opens the index file that FileSystemReader.read_metadata would",
    ),
    PrivateUse(
        "torch",
        "Tensor._version",
        ("inference/context.py", "inference/propagation.py"),
        "a cached copy of a weight is rebuilt when the weight changes in place",
        _tensor,
    ),
    # Names a checkpoint's pickles hold: the safe unpickler allows exactly these.
    PrivateUse("torch._utils", "_rebuild_tensor_v2", ("checkpoint/safe_pickle.py",), "pickled tensors in extra state"),
    PrivateUse("torch.storage", "_load_from_bytes", ("checkpoint/safe_pickle.py",), "pickled storages in extra state"),
    PrivateUse("torch.serialization", "_get_layout", ("checkpoint/safe_pickle.py",), "pickled tensor layouts"),
    PrivateUse(
        "torch.distributed.checkpoint.metadata",
        "_MEM_FORMAT_ENCODING",
        ("checkpoint/safe_pickle.py",),
        "the pickled checkpoint index",
    ),
    PrivateUse(
        "torch.distributed.checkpoint.filesystem",
        "_StorageInfo",
        ("checkpoint/safe_pickle.py",),
        "the pickled checkpoint index",
    ),
    PrivateUse(
        "torch.distributed.checkpoint.filesystem",
        "_StoragePrefix",
        ("checkpoint/safe_pickle.py",),
        "the pickled checkpoint index",
    ),
)

OTHERS = (
    PrivateUse(
        "argparse",
        "ArgumentParser._actions",
        ("training/arguments.py",),
        "every flag's default (--use-checkpoint-args, stored_args); argparse lists its actions nowhere else",
        _parser,
    ),
    PrivateUse("os", "_exit", ("launcher.py",), "documented despite its name: end the process at once, no cleanup"),
    PrivateUse(
        "numpy._core.multiarray",
        "_reconstruct",
        ("legacy/files.py",),
        "numpy arrays in Megatron-LM's legacy checkpoints (numpy.core.multiarray before numpy 2)",
    ),
)

PRIVATE_USES = MEGATRON_CORE + TORCH + OTHERS

# Private-looking attributes that are our own (reached on our own objects).
OWN = ("_time",)


def _lookup(use: PrivateUse) -> None:
    obj = use.instance() if use.instance is not None else importlib.import_module(use.module)
    parts = use.path.split(".")
    if use.instance is not None:
        parts = parts[1:]  # "Class.attribute": the instance stands for the class
    for part in parts:
        obj = getattr(obj, part)


def missing() -> List[str]:
    """The listed names this environment lacks, each with what uses it."""
    gone = []
    for use in PRIVATE_USES:
        try:
            _lookup(use)
        except (ImportError, AttributeError) as err:
            gone.append(f"{use.name} (used by {', '.join(use.used_in)}: {use.why}): {type(err).__name__}: {err}")
    return gone
