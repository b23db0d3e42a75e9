"""Start torch.distributed and megatron-core's parallel state, on CPU or GPU.

One entry point used by training, inference and the tests: it picks gloo on CPU
and NCCL on CUDA, validates the layout against the world size with one-line
errors, and seeds megatron-core's RNG tracker.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from megatron.core import parallel_state, tensor_parallel

from megatron.early_exit import platform
from megatron.early_exit.errors import ConfigError


class ParallelConfigError(ConfigError):
    """A parallel layout that cannot run here (wrong sizes, missing device)."""


@dataclass(frozen=True)
class ParallelContext:
    """What code below the entry point needs to know about its place in the layout."""

    device: torch.device
    rank: int
    world_size: int
    dp_size: int
    # Whether megatron-core's gloo twins of the data-parallel groups exist; the
    # optimizer must be told, or it asserts on groups that are not there.
    gloo_process_groups: bool = True


_TARGET_DEVICE: torch.device | None = None


def resolve_device(device: str | None) -> torch.device:
    """`None`/"auto" keeps this process's target device once there is one, else picks
    CUDA when present (and megatron-core is not already set up for the CPU); asking for
    CUDA without it is an error."""
    if device in (None, "auto"):
        if _TARGET_DEVICE is not None:
            return _TARGET_DEVICE
        return torch.device("cuda" if torch.cuda.is_available() and not platform.is_applied() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ParallelConfigError(
            f"device '{device}' was requested but CUDA is not available on this machine; use --device cpu"
        )
    if dev.type == "cuda" and platform.is_applied():
        raise ParallelConfigError(
            f"device '{device}' was requested but this process already runs megatron-core on the CPU "
            "(the CPU platform adapter is applied); start a new process for CUDA"
        )
    return dev


def target_device() -> torch.device:
    """The device models of this process run on: the one `initialize_parallel` set up
    (before that, what `--device auto` would pick). Layer specs follow it."""
    return resolve_device(None)


def local_cuda_index() -> int:
    """This process's GPU: its LOCAL_RANK (one process per GPU, as NCCL needs)."""
    local_rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local_rank >= count:
        raise ParallelConfigError(
            f"LOCAL_RANK {local_rank} has no GPU: this host has {count} CUDA device(s), one per "
            "process; start at most that many processes per host (--nproc-per-node), or use --device cpu"
        )
    return local_rank


def validate_layout(world_size: int, tp_size: int, pp_size: int) -> int:
    """Return the data-parallel size, or raise naming the flag that is wrong."""
    for flag, size in (("--tensor-model-parallel-size", tp_size), ("--pipeline-model-parallel-size", pp_size)):
        if size < 1:
            raise ParallelConfigError(f"{flag} must be >= 1, got {size}")
    if world_size % (tp_size * pp_size) != 0:
        raise ParallelConfigError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp_size}) "
            f"x --pipeline-model-parallel-size ({pp_size}) = {tp_size * pp_size}"
        )
    return world_size // (tp_size * pp_size)


def initialize_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    device: str | None = None,
    timeout_minutes: int = 10,
    gloo_process_groups: bool | None = None,
    tied_embedding_stages: Sequence[int] = (),
) -> ParallelContext:
    """Initialise the process group (from torchrun's environment, or as a single
    process when launched without it) and megatron-core's model-parallel groups.

    `tied_embedding_stages`: pipeline stages that hold an instance of the word
    embedding (first stage, tied output layer, tied exits); their gradients are
    all-reduced over a group we own (megatron-core's own group only ever pairs the
    first and last stage).

    `gloo_process_groups`: also create megatron-core's gloo groups (default: on CPU
    only, as Megatron-LM's --disable-gloo-process-groups does on GPU)."""
    global _TARGET_DEVICE
    dev = resolve_device(device)
    if dev.type == "cpu":
        # Before megatron-core's groups, RNG tracker and allocations: on a CUDA machine
        # they would otherwise take CUDA paths for a CPU run.
        platform.apply(dev)
    if gloo_process_groups is None:
        gloo_process_groups = dev.type == "cpu"
    if not torch.distributed.is_initialized():
        # Without a launcher's rendezvous, a free local port, kept out of os.environ so that
        # child processes (tools, servers, measured runs) do not try to bind it again.
        launched = "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ
        init_method = None if launched else f"tcp://127.0.0.1:{_free_port()}"
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        validate_layout(world_size, tensor_model_parallel_size, pipeline_model_parallel_size)
        if dev.type == "cuda":
            torch.cuda.set_device(local_cuda_index())
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.distributed.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    world_size = torch.distributed.get_world_size()
    dp_size = validate_layout(world_size, tensor_model_parallel_size, pipeline_model_parallel_size)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
        _destroy_subgroups()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        create_gloo_process_groups=gloo_process_groups,
        # megatron-core's embedding group is reduced to the first stage (a no-op);
        # allreduce_tied_embedding_grads handles every stage that holds a copy.
        get_embedding_ranks=lambda pp_ranks, *unused: pp_ranks[:1],
    )
    _build_tied_embedding_group(tied_embedding_stages)
    _TARGET_DEVICE = dev
    set_seed(seed)
    return ParallelContext(
        device=dev,
        rank=torch.distributed.get_rank(),
        world_size=world_size,
        dp_size=dp_size,
        gloo_process_groups=gloo_process_groups,
    )


def _destroy_subgroups() -> None:
    """Free every process group but the default one before a re-initialisation: each
    gloo group keeps its own threads, and megatron-core creates dozens per layout."""
    from torch.distributed import distributed_c10d

    default = torch.distributed.group.WORLD
    for group in list(distributed_c10d._world.pg_map):  # no public listing (private_api.py)
        if group is not default:
            torch.distributed.destroy_process_group(group)


_TIED_EMBEDDING_GROUP = None


def _build_tied_embedding_group(stages: Sequence[int]) -> None:
    """One group per pipeline: the ranks at `stages`. Every rank creates every group."""
    global _TIED_EMBEDDING_GROUP
    _TIED_EMBEDDING_GROUP = None
    stages = sorted(set(stages))
    if len(stages) < 2:
        return
    mine = torch.distributed.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    for pipeline in sorted({tuple(r) for r in everyone}):
        members = [pipeline[s] for s in stages]
        group = torch.distributed.new_group(members)
        if torch.distributed.get_rank() in members:
            _TIED_EMBEDDING_GROUP = group


def allreduce_tied_embedding_grads(model) -> None:
    """Sum the gradients of every stage's instance of the word embedding, so that the
    copies (identical at start) stay identical after each optimizer step. `model`: the
    stage's model or its model chunks (interleaved pipeline: a stage may hold several
    copies, summed here first)."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    if _TIED_EMBEDDING_GROUP is None and len(chunks) == 1:
        return
    grads = [g for g in map(_tied_embedding_grad, chunks) if g is not None]
    if not grads:
        return
    total = grads[0] if len(grads) == 1 else torch.stack(grads).sum(0)
    if _TIED_EMBEDDING_GROUP is not None:
        torch.distributed.all_reduce(total, group=_TIED_EMBEDDING_GROUP)
    for grad in grads:
        if grad is not total:
            grad.copy_(total)


def _tied_embedding_grad(model):
    inner = model
    while hasattr(inner, "module"):
        inner = inner.module
    weight = inner.tied_embedding_weight()
    if weight is None or not weight.requires_grad:  # frozen (exit tuning): nothing to share
        return None
    grad = getattr(weight, "main_grad", None)
    if grad is None:
        grad = weight.grad
    if grad is None:
        raise RuntimeError("a stage in the tied-embedding group has no embedding gradient")
    return grad


def set_seed(seed: int) -> None:
    """Seed the host RNG and megatron-core's tracker (the same seed on every rank, as
    Megatron-LM does for model-parallel state, offset per TP rank inside the tracker)."""
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    # The CPU tracker seeds the default generator with the DP seed; put the
    # user's seed back so that host-side sampling is reproducible from `seed`.
    torch.manual_seed(seed)


def destroy_parallel() -> None:
    global _TARGET_DEVICE
    _TARGET_DEVICE = None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
        _destroy_subgroups()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
