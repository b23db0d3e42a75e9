"""Checkpoints with megatron-core dist_checkpointing (torch_dist format), published atomically.

Layout under `--save DIR`:
    DIR/iter_0000100/                       one complete checkpoint (sharded tensors + common.pt)
    DIR/latest_checkpointed_iteration.txt   written last, by rename

A save goes to `iter_XXXXXXX.tmp`, is renamed when every rank has finished, and only
then is the marker updated; a process killed at any moment leaves the previous
checkpoint and marker intact. Tensor keys use global layer numbers (one key per layer,
exits keyed by their layer), so a checkpoint loads into any TP/PP/DP layout and into a
model that keeps only the first layers (exit tuning on the first pipeline stages).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import time
from typing import List, Optional, Tuple

import torch

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron.early_exit.checkpoint_reader import (  # noqa: F401  (the reader's names, for callers of this module)
    MODEL_METADATA, TRACKER, CheckpointError, _apply_model_state, _load, _model_state, _unwrap, checkpoint_dir,
    latest_iteration, load_weights, model_sharded_state, read_common, read_model_config, read_sharded, resolve, verify,
)

CHECKPOINT_VERSION = 2
# The distributed optimizer's state in a layout-independent form, so that a checkpoint
# reshards across TP/PP/DP like the model does.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", **MODEL_METADATA}
# Flags that decide the parameters' names and shapes; they must agree with the checkpoint.
ARCHITECTURE_ARGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "group_query_attention",
    "num_query_groups", "kv_channels", "normalization", "swiglu", "position_embedding_type",
    "untie_embeddings_and_output_weights", "disable_bias_linear",
)
EXIT_STRUCTURE_ARGS = ("use_exit_norm", "use_exit_mlp", "use_exit_block", "untie_exit_output_weights")
# Test hook: EE_CHECKPOINT_TEST_PAUSE="<moment>:<iteration>:<file>" makes rank 0 create <file>
# at that moment of that iteration's save and wait there (to be killed). Moments:
# before_rename (shards written), before_marker (renamed, marker not yet updated).
PAUSE_ENV = "EE_CHECKPOINT_TEST_PAUSE"




def _layout() -> Tuple[int, int, int]:
    return (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    )


def _rng_state() -> ShardedObject:
    state = {
        "cpu": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        "cuda": torch.cuda.get_rng_state() if _on_cuda() else None,
    }
    tp, pp, dp = _layout()
    rank = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", state, (pp, tp, dp), rank, replica_id=0)


def _on_cuda() -> bool:
    """Whether this process runs on CUDA (not merely has it: a CPU run on a GPU host)."""
    from megatron.early_exit.parallel import target_device

    return target_device().type == "cuda"


def _stored_args(args, model) -> dict:
    """The run's flags (--use-checkpoint-args reads them); a checkpoint written without
    a run (converters) stores its model's as flags."""
    if args is None:
        return _unwrap(model).model_config.to_flags()
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}


def stored_args(path: str, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1):
    """The training flags saved with the checkpoint at `path`, defaults filled for newer
    flags, re-laid out for these TP and PP sizes (no sequence parallelism): a namespace
    for tools that rebuild a training run (reshard)."""
    import argparse

    from megatron.early_exit.training.arguments import build_parser

    saved = read_common(path)["args"]
    args = argparse.Namespace(**{a.dest: a.default for a in build_parser()._actions if a.dest != "help"})
    vars(args).update(saved)
    args.saved_tensor_model_parallel_size = args.tensor_model_parallel_size
    args.tensor_model_parallel_size = tensor_model_parallel_size
    args.pipeline_model_parallel_size = pipeline_model_parallel_size
    args.sequence_parallel = False
    args.transformer_impl = None  # the layer modules follow the device the run is on
    return args


def stored_model_config(model, args, root: str) -> dict:
    """The model's description as stored: tokenizer files inside `root` named relative
    to it, so that a copied or moved checkpoint directory finds them."""
    from megatron.early_exit.models.model_config import ModelConfig

    config = getattr(_unwrap(model), "model_config", None) or ModelConfig.from_flags(vars(args), _unwrap(model).vocab_size)
    return {**config.to_dict(), "tokenizer": vars(config.tokenizer.relative_to(root))}


def _sharded_state(args, model, optimizer, scheduler, iteration, consumed_samples, root, include_optimizer=True):
    model_sd = model_sharded_state(model)
    state = {
        "model": model_sd,
        "model_config": stored_model_config(model, args, root),
        "args": _stored_args(args, model),
        "layout": _layout(),
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


# -- saving -----------------------------------------------------------------------


def save(args, model, optimizer, scheduler, iteration: int, consumed_samples: int) -> str:
    """Everything needed to resume training, published atomically under `args.save`."""
    return _publish(args.save, iteration, lambda: _sharded_state(args, model, optimizer, scheduler, iteration, consumed_samples,
                                                                 args.save),
                    keep_last=getattr(args, "keep_last", None))


def save_weights(root: str, args, model, iteration: int = 0) -> str:
    """A weights-only checkpoint (no optimizer, scheduler or RNG), e.g. written by a
    converter; training loads it with --finetune or --no-load-optim."""
    return _publish(root, iteration, lambda: _sharded_state(args, model, None, None, iteration, 0, root,
                                                            include_optimizer=False))


def _pause_here(moment: str, iteration: int) -> None:
    spec = os.environ.get(PAUSE_ENV, "").split(":", 2)
    if len(spec) == 3 and spec[0] == moment and int(spec[1]) == iteration:
        open(spec[2], "w").close()
        while True:
            time.sleep(1)


def _publish(root: str, iteration: int, build_state, keep_last: Optional[int] = None) -> str:
    start = time.time()
    final = checkpoint_dir(root, iteration)
    tmp = final + ".tmp"
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        for stale in glob.glob(os.path.join(root, "iter_*.tmp")) + glob.glob(os.path.join(root, "iter_*.old")):
            shutil.rmtree(stale, ignore_errors=True)  # left by a save that was killed
        os.makedirs(tmp)
    torch.distributed.barrier()
    dist_checkpointing.save(build_state(), tmp)
    torch.distributed.barrier()
    if rank0:
        _pause_here("before_rename", iteration)
        if os.path.isdir(final):  # saving the same iteration again: keep the old one until the new is in place
            os.replace(final, final + ".old")
        os.replace(tmp, final)
        _pause_here("before_marker", iteration)
        marker = os.path.join(root, TRACKER)
        with open(marker + ".tmp", "w") as f:
            f.write(str(iteration))
        os.replace(marker + ".tmp", marker)
        shutil.rmtree(final + ".old", ignore_errors=True)
        if keep_last:
            for old in sorted(glob.glob(os.path.join(root, "iter_[0-9]*[0-9]")))[:-keep_last]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        print(f" saved checkpoint at iteration {iteration} to {final} in {time.time() - start:.2f} s", flush=True)
    torch.distributed.barrier()
    return final


# -- reading (the reader is checkpoint_reader.py) -----------------------------------


def read_args(root: str) -> dict:
    """The flags stored with the latest checkpoint under `root` (for --use-checkpoint-args),
    its tokenizer files found where the checkpoint is now (it may have been moved)."""
    path = resolve(root)
    flags = dict(read_common(path)["args"])
    tokenizer = read_model_config(path).tokenizer
    flags.update(tokenizer_type=tokenizer.type, tokenizer_model=tokenizer.model, vocab_file=tokenizer.vocab_file,
                 merge_file=tokenizer.merge_file, vocab_size=tokenizer.vocab_size)
    return flags


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def compare_with_checkpoint(saved: dict, args) -> List[int]:
    """Raise if the model the flags build cannot take this checkpoint's weights, listing
    every difference. Returns the exits the model has and the checkpoint lacks (they keep
    their fresh initialisation)."""
    problems = [
        f"{_flag(k)}: checkpoint {saved[k]!r}, now {getattr(args, k)!r}"
        for k in ARCHITECTURE_ARGS if k in saved and saved[k] != getattr(args, k)
    ]
    saved_exits, exits = list(saved.get("exit_layer_nums") or []), list(args.exit_layer_nums)
    missing_in_model = sorted(set(saved_exits) - set(exits))
    new_exits = sorted(set(exits) - set(saved_exits))
    if missing_in_model:
        problems.append(f"--exit-layer-nums: the checkpoint has exits at layers {missing_in_model} that this model lacks "
                        f"(checkpoint {saved_exits}, now {exits})")
    if set(saved_exits) & set(exits):
        problems += [f"{_flag(k)}: checkpoint {saved.get(k)!r}, now {getattr(args, k)!r} (changes the exit heads)"
                     for k in EXIT_STRUCTURE_ARGS if bool(saved.get(k)) != bool(getattr(args, k))]
    if problems:
        raise CheckpointError("the checkpoint does not match this model:\n  " + "\n  ".join(problems))
    return new_exits


def load(args, model, optimizer, scheduler) -> Tuple[int, int]:
    """`--load`: weights, and unless told otherwise optimizer, scheduler and RNG; returns
    (iteration, consumed samples). --finetune reads weights only and starts at 0."""
    path = resolve(args.load)
    common = read_common(path)
    new_exits = compare_with_checkpoint(common["args"], args)
    weights_only = args.finetune or args.no_load_optim
    if not common.get("has_optimizer", True) and not weights_only:
        raise CheckpointError(f"--load {path} holds weights only (no optimizer state): add --finetune or --no-load-optim")
    if new_exits and not weights_only:
        raise CheckpointError(f"--load {path}: exits at layers {new_exits} are new (the checkpoint has "
                              f"{common['args'].get('exit_layer_nums') or 'none'}); add --finetune or --no-load-optim")
    rank0 = torch.distributed.get_rank() == 0
    if new_exits and rank0:
        print(f" exits at layers {new_exits} are not in the checkpoint: they keep their initialisation", flush=True)

    model_sd, model_state, skipped = _model_state(model, new_exits)
    state = {"model": model_state}
    if not weights_only:
        _materialise_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIMIZER_METADATA)
    same_layout = tuple(common.get("layout", ())) == _layout()
    # RNG states are saved with the optimizer state (full saves only), one per rank of the layout.
    load_rng = not (args.finetune or args.no_load_rng) and common.get("has_optimizer", True) and same_layout
    if not same_layout and not (args.finetune or args.no_load_rng) and rank0:
        print(f" checkpoint layout (TP, PP, DP) = {tuple(common.get('layout', ()))}, now {_layout()}: "
              "weights and optimizer are resharded, RNG states are not restored", flush=True)
    if load_rng:
        state["rng_state"] = _rng_state()

    start = time.time()
    loaded = _load(state, path)
    _apply_model_state(model, loaded["model"], skipped, path)
    if not weights_only:
        with _step_kept_out_of_state_copy(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(common["opt_param_scheduler"])
    if load_rng:
        rng = loaded["rng_state"]
        torch.set_rng_state(rng["cpu"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
        if rng.get("cuda") is not None and _on_cuda():
            torch.cuda.set_rng_state(rng["cuda"])
    if rank0:
        print(f" loaded checkpoint {path} in {time.time() - start:.2f} s", flush=True)
    if args.finetune:
        return 0, 0
    return common["iteration"], common["consumed_samples"]


def _torch_adams(optimizer):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [opt for opt in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(opt, DistributedOptimizer) and isinstance(opt.optimizer, torch.optim.Adam)]


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
