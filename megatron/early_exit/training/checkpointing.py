"""Checkpoints with megatron-core dist_checkpointing (torch_dist format), published atomically.

Layout under `--save DIR`:
    DIR/iter_0000100/                 one complete checkpoint (sharded tensors + common.pt)
    DIR/latest_checkpointed_iteration.txt   written last, by rename

A save goes to `iter_XXXXXXX.tmp`, is renamed when every rank has finished, and
only then is the marker updated; a crash at any moment leaves the previous
checkpoint and marker intact. Tensor keys use global layer numbers, so a
checkpoint loads into any TP/PP/DP layout.
"""

from __future__ import annotations

import os
import shutil
from typing import Tuple

import torch

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron.early_exit.errors import EarlyExitError

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 1
# The distributed optimizer's state in a layout-independent form, so that a checkpoint
# reshards across TP/PP/DP like the model does.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(EarlyExitError):
    """A checkpoint that is missing, incomplete, or does not match the model."""


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _rng_state() -> ShardedObject:
    state = {
        "cpu": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }
    pp, tp, dp = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    shape = (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    )
    return ShardedObject("rng_state", state, shape, (pp, tp, dp), replica_id=0)


def _sharded_state(args, model, optimizer, scheduler, iteration, consumed_samples, include_optimizer=True):
    model_sd = _unwrap(model).sharded_state_dict()
    state = {
        "model": model_sd,
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))},
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "checkpoint_version": CHECKPOINT_VERSION,
        "has_optimizer": include_optimizer,
    }
    if include_optimizer:
        state["rng_state"] = _rng_state()
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=OPTIMIZER_METADATA)
        state["opt_param_scheduler"] = scheduler.state_dict()
    return state


def save(args, model, optimizer, scheduler, iteration: int, consumed_samples: int) -> str:
    """Everything needed to resume training, published atomically under `args.save`."""
    return _publish(args.save, iteration, lambda: _sharded_state(args, model, optimizer, scheduler, iteration, consumed_samples))


def save_weights(root: str, args, model, iteration: int = 0) -> str:
    """A weights-only checkpoint (no optimizer, scheduler or RNG), e.g. written by a
    converter; training loads it with --finetune or --no-load-optim."""
    return _publish(root, iteration, lambda: _sharded_state(args, model, None, None, iteration, 0, include_optimizer=False))


def _publish(root: str, iteration: int, build_state) -> str:
    final = checkpoint_dir(root, iteration)
    tmp = final + ".tmp"
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    torch.distributed.barrier()
    dist_checkpointing.save(build_state(), tmp)
    torch.distributed.barrier()
    if rank0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        marker = os.path.join(root, TRACKER)
        with open(marker + ".tmp", "w") as f:
            f.write(str(iteration))
        os.replace(marker + ".tmp", marker)
        print(f" saved checkpoint at iteration {iteration} to {final}", flush=True)
    torch.distributed.barrier()
    return final


def latest_iteration(root: str) -> int:
    marker = os.path.join(root, TRACKER)
    if not os.path.isfile(marker):
        raise CheckpointError(f"--load {root}: no {TRACKER} (not a checkpoint directory, or no save finished)")
    text = open(marker).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"--load {root}: {TRACKER} is corrupt ({text!r})")
    return int(text)


def load(args, model, optimizer, scheduler) -> Tuple[int, int]:
    """Load model, optimizer, scheduler and RNG; returns (iteration, consumed samples)."""
    iteration = latest_iteration(args.load)
    path = checkpoint_dir(args.load, iteration)
    if not os.path.isdir(path):
        raise CheckpointError(f"--load {args.load}: {path} named by {TRACKER} does not exist")
    state = _sharded_state(args, model, optimizer, scheduler, iteration, 0)
    state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=True, metadata=OPTIMIZER_METADATA)
    try:
        loaded = dist_checkpointing.load(state, path)
    except Exception as err:  # name the checkpoint, keep the cause
        raise CheckpointError(f"--load {path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    _unwrap(model).load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["opt_param_scheduler"])
    rng = loaded["rng_state"]
    torch.set_rng_state(rng["cpu"])
    tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return loaded["iteration"], loaded["consumed_samples"]
