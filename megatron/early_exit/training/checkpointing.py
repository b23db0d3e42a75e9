"""The training state in a checkpoint: optimizer, learning-rate scheduler, RNG states,
iteration and consumed samples, saved beside the weights and read back on resume.

The weights, the model description, atomic publishing and the checksums are the
checkpoint package's (megatron/early_exit/checkpoint/, layout in its __init__); this module
adds what only training needs. The optimizer's state is stored reshardable, so a
checkpoint resumes under any TP/PP/DP layout like the weights do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Tuple

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron.early_exit.checkpoint.checksums import verify_on_all_ranks
from megatron.early_exit.checkpoint.compatibility import compare_with_checkpoint
from megatron.early_exit.checkpoint.errors import CheckpointError
from megatron.early_exit.checkpoint.reader import (
    MODEL_METADATA,
    apply_model_state,
    model_state_to_read,
    read_common,
    read_model_config,
    read_sharded,
    resolve,
    unwrap,
)
from megatron.early_exit.checkpoint.writer import parallel_layout, publish, weights_state

# The distributed optimizer's state in a layout-independent form, so that a checkpoint
# reshards across TP/PP/DP like the model does.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", **MODEL_METADATA}


def optimizer_metadata(optimizer) -> dict:
    """The distributed optimizer's reshardable save gathers its whole state: by default with
    NCCL onto every DP rank's host memory; where it has gloo groups, megatron-core's
    memory-efficient exchange gathers it on DP rank 0 only (both read back the same)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    distributed = [
        o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if isinstance(o, DistributedOptimizer)
    ]
    gloo = bool(distributed) and all(o.data_parallel_group_gloo is not None for o in distributed)
    return {**OPTIMIZER_METADATA, "distrib_optim_fully_reshardable_mem_efficient": gloo}


def _rng_state() -> ShardedObject:
    state = {
        "cpu": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        "cuda": torch.cuda.get_rng_state() if _on_cuda() else None,
        "device": _rng_device(),  # the tracker's states are the generator states of this device type
    }
    tp, pp, dp = parallel_layout()
    rank = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", state, (pp, tp, dp), rank, replica_id=0)


def _rng_device() -> str:
    return "cuda" if _on_cuda() else "cpu"


def _restore_rng(rng: dict, rank0: bool) -> None:
    """The RNG states of the run that saved, where this run's generators can take them: the
    tracker's states are CUDA generator states on a GPU and CPU ones on the CPU, so across
    devices only the CPU generator is restored. (Checkpoints from before the device was
    stored saved a CUDA state exactly when they ran on CUDA.)"""
    torch.set_rng_state(rng["cpu"])
    saved = rng.get("device") or ("cuda" if rng.get("cuda") is not None else "cpu")
    if saved != _rng_device():
        if rank0:
            print(
                f" checkpoint RNG states were saved on {saved}, this run is on {_rng_device()}: the CPU generator is "
                "restored, the device generators keep this run's seed",
                flush=True,
            )
        return
    tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
    if rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"])


def _on_cuda() -> bool:
    """Whether this process runs on CUDA (not merely has it: a CPU run on a GPU host)."""
    from megatron.early_exit.parallel import target_device

    return target_device().type == "cuda"


def _sharded_state(flags, model, optimizer, scheduler, iteration, consumed_samples, root) -> dict:
    """The weights' state (checkpoint/writer.py; `flags` stored as its "args") and the
    training state beside it."""
    state = weights_state(flags, model, iteration, consumed_samples, root, has_optimizer=True)
    state["rng_state"] = _rng_state()
    state["optimizer"] = optimizer.sharded_state_dict(
        state["model"], is_loading=False, metadata=optimizer_metadata(optimizer)
    )
    state["opt_param_scheduler"] = scheduler.state_dict()
    return state


# -- saving -----------------------------------------------------------------------


def save(config, model, optimizer, scheduler, iteration: int, consumed_samples: int, checksums: bool = True) -> str:
    """Everything to resume the run `config` (a RunConfig; its flags stored), published
    atomically under --save; weights holding NaN or Inf are refused (the previous
    checkpoints stay)."""
    root = config.checkpoint.save
    require_finite_weights(model, iteration, root)
    return publish(
        root,
        iteration,
        lambda: _sharded_state(config.flags, model, optimizer, scheduler, iteration, consumed_samples, root),
        keep_last=config.checkpoint.keep_last,
        checksums=checksums,
    )


def require_finite_weights(model, iteration: int, root: str) -> None:
    """Raise on every rank if any rank's weights hold NaN or Inf."""
    from megatron.early_exit.parallel import target_device

    named = [(n, p) for n, p in unwrap(model).named_parameters()]
    finite = (
        torch.stack([torch.isfinite(p.detach()).all() for _, p in named]) if named else torch.ones(1, dtype=torch.bool)
    )
    everywhere = finite.all().to(device=target_device(), dtype=torch.int32).reshape(1)
    torch.distributed.all_reduce(everywhere, op=torch.distributed.ReduceOp.MIN)
    if everywhere.item():
        return
    where = next((n for (n, _), ok in zip(named, finite.tolist()) if not ok), "on another rank")
    raise CheckpointError(
        f"iteration {iteration}: the weights hold NaN or Inf ({where}); not saved under --save {root}, "
        "whose checkpoints are kept"
    )


# -- loading ----------------------------------------------------------------------


def load(config, model, optimizer, scheduler, checksums: bool = True) -> Tuple[int, int]:
    """`--load` of the run `config` (a RunConfig): weights, and unless told otherwise
    optimizer, scheduler and RNG; returns (iteration, consumed samples). --finetune reads
    weights only and starts at 0."""
    ckpt = config.checkpoint
    path = resolve(ckpt.load, ckpt.load_iteration, checksums=False)
    if checksums:
        verify_on_all_ranks(path)
    common = read_common(path)
    stored = read_model_config(path)
    new_exits = compare_with_checkpoint(
        stored, _compared_model(stored, unwrap(model).model_config, config.model.num_layers, path)
    )
    weights_only = ckpt.finetune or ckpt.no_load_optim
    if not common.get("has_optimizer", True) and not weights_only:
        raise CheckpointError(
            f"--load {path} holds weights only (no optimizer state): add --finetune or --no-load-optim"
        )
    if new_exits and not weights_only:
        raise CheckpointError(
            f"--load {path}: exits at layers {new_exits} are new (the checkpoint has "
            f"{stored.exit_layer_nums or 'none'}); add --finetune or --no-load-optim"
        )
    rank0 = torch.distributed.get_rank() == 0
    if new_exits and rank0:
        print(f" exits at layers {new_exits} are not in the checkpoint: they keep their initialisation", flush=True)
    return _load_state(ckpt, model, optimizer, scheduler, path, common, new_exits, weights_only)


def _compared_model(stored, built, num_layers: int, path: str):
    """The description a checkpoint is compared with: the whole model the flags describe
    (`num_layers` deep), even where the run builds only its first stages; a checkpoint
    of first stages only (a run with --tune-exit-pipeline-parallel-size) is compared with
    the same first stages."""
    if stored.first_stages_only:
        if not built.first_stages_only or built.num_layers != stored.num_layers:
            raise CheckpointError(
                f"--load {path} holds only the first {stored.num_layers} layers (exits tuned with "
                f"--tune-exit-pipeline-parallel-size), this run builds {built.num_layers} of {num_layers}: load it "
                "with the "
                "same --pipeline-model-parallel-size and --tune-exit-pipeline-parallel-size, or put its exits back "
                "on the "
                "whole model with tools/checkpoint/add_exits.py --exits-from"
            )
        return built
    return dataclasses.replace(built, num_layers=num_layers, first_stages_only=False)


def _load_state(ckpt, model, optimizer, scheduler, path, common, new_exits, weights_only) -> Tuple[int, int]:
    rank0 = torch.distributed.get_rank() == 0
    model_sd, model_state, skipped = model_state_to_read(model, new_exits)
    state = {"model": model_state}
    if not weights_only:
        _materialise_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=optimizer_metadata(optimizer)
        )
    same_layout = tuple(common.get("layout", ())) == parallel_layout()
    # RNG states are saved with the optimizer state (full saves only), one per rank of the layout.
    load_rng = not (ckpt.finetune or ckpt.no_load_rng) and common.get("has_optimizer", True) and same_layout
    if not same_layout and not (ckpt.finetune or ckpt.no_load_rng) and rank0:
        print(
            f" checkpoint layout (TP, PP, DP) = {tuple(common.get('layout', ()))}, now {parallel_layout()}: "
            "weights and optimizer are resharded, RNG states are not restored",
            flush=True,
        )
    if load_rng:
        state["rng_state"] = _rng_state()

    start = time.time()
    loaded = read_sharded(state, path)
    apply_model_state(model, loaded["model"], skipped, path)
    if not weights_only:
        with _step_kept_out_of_state_copy(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(common["opt_param_scheduler"])
    if load_rng:
        _restore_rng(loaded["rng_state"], rank0)
    if rank0:
        print(f" loaded checkpoint {path} in {time.time() - start:.2f} s", flush=True)
    if ckpt.finetune:
        return 0, 0
    return common["iteration"], common["consumed_samples"]


def _torch_adams(optimizer):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [
        opt
        for opt in getattr(optimizer, "chained_optimizers", [optimizer])
        if isinstance(opt, DistributedOptimizer) and isinstance(opt.optimizer, torch.optim.Adam)
    ]


def _materialise_optimizer_state(optimizer) -> None:
    """Give a fresh torch Adam its state tensors and step before loading into it: the
    distributed optimizer reads the step from every parameter's state, which torch.optim
    only creates on the first step (Apex/TE keep it in the param groups instead)."""
    for opt in _torch_adams(optimizer):
        opt.init_state_fn(opt.optimizer, opt.config)
        for param_state in opt.optimizer.state.values():
            param_state.setdefault("step", torch.tensor(0.0))


@contextlib.contextmanager
def _step_kept_out_of_state_copy(optimizer):
    """megatron-core 0.16.1's fully reshardable load copies every state entry of a torch
    Adam parameter, 'step' included, from tensors that never hold a step (it was already
    set from the param groups); keep 'step' out of that copy, and unshare it afterwards."""
    patched = []
    for opt in _torch_adams(optimizer):

        def copy_states(model_param, tensors, opt=opt, original=opt._set_main_param_and_optimizer_states):
            group, order = opt.model_param_group_index_map[model_param]
            state = opt.optimizer.state[opt.optimizer.param_groups[group]["params"][order]]
            step = state.pop("step", None)
            try:
                original(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        opt._set_main_param_and_optimizer_states = copy_states
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states
            # The load gave every parameter the same step tensor; Adam increments each
            # parameter's step in place, so each needs its own.
            for param_state in opt.optimizer.state.values():
                if "step" in param_state:
                    param_state["step"] = param_state["step"].clone()
