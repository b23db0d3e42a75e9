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
from typing import Dict, List, Optional, Tuple

import torch

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron.early_exit.errors import EarlyExitError

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 2
# One key per layer (global number) rather than a stacked tensor of all layers.
MODEL_METADATA = {"non_homogeneous_layers": True}
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


class CheckpointError(EarlyExitError):
    """A checkpoint that is missing, incomplete, or does not match the model."""


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def model_sharded_state(model) -> dict:
    """The model's sharded state dict in this module's key layout (also for readers)."""
    return _unwrap(model).sharded_state_dict(metadata=dict(MODEL_METADATA))


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


def _stored_args(args) -> dict:
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}


def _sharded_state(args, model, optimizer, scheduler, iteration, consumed_samples, include_optimizer=True):
    model_sd = model_sharded_state(model)
    state = {
        "model": model_sd,
        "args": _stored_args(args),
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
    return _publish(args.save, iteration, lambda: _sharded_state(args, model, optimizer, scheduler, iteration, consumed_samples),
                    keep_last=getattr(args, "keep_last", None))


def save_weights(root: str, args, model, iteration: int = 0) -> str:
    """A weights-only checkpoint (no optimizer, scheduler or RNG), e.g. written by a
    converter; training loads it with --finetune or --no-load-optim."""
    return _publish(root, iteration, lambda: _sharded_state(args, model, None, None, iteration, 0, include_optimizer=False))


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


# -- reading ----------------------------------------------------------------------


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


def read_args(root: str) -> dict:
    """The flags stored with the latest checkpoint under `root` (for --use-checkpoint-args)."""
    return read_common(resolve(root))["args"]


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
