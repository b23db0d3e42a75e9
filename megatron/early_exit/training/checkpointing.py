"""Checkpoints with megatron-core dist_checkpointing (torch_dist format), published atomically.

Layout under `--save DIR`:
    DIR/iter_0000100/                       one complete checkpoint (sharded tensors + common.pt)
    DIR/iter_0000100/checksums.json         size and CRC-32 of each of its files, written after them
    DIR/latest_checkpointed_iteration.txt   written last, by rename
    DIR/.lock                               held (flock) by the run that writes to DIR

A save goes to `iter_XXXXXXX.tmp`, is renamed when every rank has finished, and only
then is the marker updated; a process killed at any moment leaves the previous
checkpoint and marker intact. The files are written by threads of the training processes
(no helper processes that could outlive them). Tensor keys use global layer numbers (one
key per layer, exits keyed by their layer), so a checkpoint loads into any TP/PP/DP layout
and into a model that keeps only the first layers (exit tuning on the first pipeline stages).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import glob
import json
import os
import queue
import re
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Optional, Tuple

import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron.early_exit.checkpoint_reader import (  # noqa: F401  (the reader's names, for callers of this module)
    MANIFEST,
    MODEL_METADATA,
    TRACKER,
    CheckpointError,
    _apply_model_state,
    _cause_of_kind,
    _load,
    _model_state,
    _unwrap,
    checkpoint_dir,
    checksum_problems,
    compare_with_checkpoint,
    file_checksum,
    latest_iteration,
    load_weights,
    model_sharded_state,
    read_common,
    read_model_config,
    read_sharded,
    resolve,
    verify,
)

CHECKPOINT_VERSION = 2
# The distributed optimizer's state in a layout-independent form, so that a checkpoint
# reshards across TP/PP/DP like the model does.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", **MODEL_METADATA}
LOCK_FILE = ".lock"


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
        "device": _rng_device(),  # the tracker's states are the generator states of this device type
    }
    tp, pp, dp = _layout()
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


def _stored_args(flags: Optional[Mapping[str, Any]], model) -> dict:
    """The run's flags (--use-checkpoint-args reads them); a checkpoint written without
    a run (converters) stores its model's as flags."""
    if flags is None:
        return _unwrap(model).model_config.to_flags()
    return {k: v for k, v in flags.items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}


def stored_model_config(model, flags: Optional[Mapping[str, Any]], root: str) -> dict:
    """The model's description as stored: tokenizer files inside `root` named relative
    to it, so that a copied or moved checkpoint directory finds them."""
    from megatron.early_exit.models.model_config import ModelConfig

    config = getattr(_unwrap(model), "model_config", None) or ModelConfig.from_flags(flags, _unwrap(model).vocab_size)
    return {**config.to_dict(), "tokenizer": vars(config.tokenizer.relative_to(root))}


def _sharded_state(flags, model, optimizer, scheduler, iteration, consumed_samples, root, include_optimizer=True):
    model_sd = model_sharded_state(model)
    state = {
        "model": model_sd,
        "model_config": stored_model_config(model, flags, root),
        "args": _stored_args(flags, model),
        "layout": _layout(),
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "checkpoint_version": CHECKPOINT_VERSION,
        "has_optimizer": include_optimizer,
    }
    if include_optimizer:
        state["rng_state"] = _rng_state()
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=False, metadata=optimizer_metadata(optimizer)
        )
        state["opt_param_scheduler"] = scheduler.state_dict()
    return state


# -- saving -----------------------------------------------------------------------


def save(config, model, optimizer, scheduler, iteration: int, consumed_samples: int, checksums: bool = True) -> str:
    """Everything to resume the run `config` (its flags stored), published atomically under
    --save; weights holding NaN or Inf are refused (the previous checkpoints stay)."""
    root = config.checkpoint.save
    require_finite_weights(model, iteration, root)
    return _publish(
        root,
        iteration,
        lambda: _sharded_state(config.flags, model, optimizer, scheduler, iteration, consumed_samples, root),
        keep_last=config.checkpoint.keep_last,
        checksums=checksums,
    )


def require_finite_weights(model, iteration: int, root: str) -> None:
    """Raise on every rank if any rank's weights hold NaN or Inf."""
    from megatron.early_exit.parallel import target_device

    named = [(n, p) for n, p in _unwrap(model).named_parameters()]
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


def save_weights(root: str, flags: Optional[Mapping[str, Any]], model, iteration: int = 0) -> str:
    """A weights-only checkpoint (no optimizer, scheduler or RNG), e.g. written by a
    converter; training loads it with --finetune or --no-load-optim. `flags`: stored as
    the checkpoint's flags (None: the model's own)."""
    return _publish(
        root, iteration, lambda: _sharded_state(flags, model, None, None, iteration, 0, root, include_optimizer=False)
    )


def _publish(root: str, iteration: int, build_state, keep_last: Optional[int] = None, checksums: bool = True) -> str:
    from torch.distributed.checkpoint.api import CheckpointException

    start = time.time()
    final = checkpoint_dir(root, iteration)
    tmp = final + ".tmp"
    rank0 = torch.distributed.get_rank() == 0
    try:
        _write_checkpoint(root, tmp, iteration, build_state, checksums)
        if rank0:
            _put_in_place(root, tmp, final, iteration, keep_last)
    except (Exception, CheckpointException) as err:  # torch's CheckpointException is a BaseException
        failure = _write_failure(err, root, tmp, iteration)
        if failure is None:
            raise
        raise failure from err
    if rank0:
        print(f" saved checkpoint at iteration {iteration} to {final} in {time.time() - start:.2f} s", flush=True)
    torch.distributed.barrier()
    return final


def _write_checkpoint(root: str, tmp: str, iteration: int, build_state, checksums: bool) -> None:
    """Every rank's files of the checkpoint in `tmp`, and their manifest."""
    if torch.distributed.get_rank() == 0:
        for stale in glob.glob(os.path.join(root, "iter_*.tmp")) + glob.glob(os.path.join(root, "iter_*.old")):
            shutil.rmtree(stale, ignore_errors=True)  # left by a save that was killed
        os.makedirs(tmp)
    torch.distributed.barrier()
    with _writes_in_this_process():
        dist_checkpointing.save(build_state(), tmp)
    torch.distributed.barrier()
    if checksums:
        _write_manifest(tmp)


def _put_in_place(root: str, tmp: str, final: str, iteration: int, keep_last: Optional[int]) -> None:
    if os.path.isdir(final):  # saving the same iteration again: keep the old one until the new is in place
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    marker = os.path.join(root, TRACKER)
    with open(marker + ".tmp", "w") as f:
        f.write(str(iteration))
    os.replace(marker + ".tmp", marker)
    shutil.rmtree(final + ".old", ignore_errors=True)
    if keep_last:  # only after a complete save: the newest checkpoints stay
        for old in sorted(glob.glob(os.path.join(root, "iter_[0-9]*[0-9]")))[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)


def _write_failure(err: BaseException, root: str, tmp: str, iteration: int) -> Optional[CheckpointError]:
    """A failed save as one line when the file system refused it (no space left, no
    permission, ...), the partial checkpoint removed; None for other errors."""
    os_error = _cause_of_kind(err, OSError)
    text = f"{err} {os_error or ''}"
    no_space = (os_error is not None and os_error.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in text
    if not no_space and os_error is None:
        # torch.save reports a full disk as a RuntimeError without errno ("file write failed",
        # "basic_ios::clear: iostream error"): tell it by the space left.
        with contextlib.suppress(OSError):
            no_space = shutil.disk_usage(root).free < (1 << 20)
    if not no_space and os_error is None:
        return None
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    kept = "the partial checkpoint was removed, the previous checkpoints are kept"
    if no_space:
        return CheckpointError(f"--save {root}: no space left on the device while saving iteration {iteration}; {kept}")
    where = f" ({os_error.filename})" if os_error.filename else ""
    return CheckpointError(
        f"--save {root}: cannot write the checkpoint of iteration {iteration}: "
        f"{os_error.strerror or os_error}{where}; {kept}"
    )


def _write_manifest(tmp: str) -> None:
    """checksums.json in `tmp`: each rank sums the shard files it wrote (`__RANK_N.distcp`),
    rank 0 the others; rank 0 writes the manifest, last, before the rename publishes it."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    names = sorted(n for n in os.listdir(tmp) if n != MANIFEST)
    mine = [n for n in names if _writer_of(n, world) == rank]
    sums = {n: [os.path.getsize(os.path.join(tmp, n)), file_checksum(os.path.join(tmp, n))] for n in mine}
    every = [None] * world
    torch.distributed.all_gather_object(every, sums)
    if rank == 0:
        files = {name: entry for part in every for name, entry in part.items()}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({"format": "crc32", "files": dict(sorted(files.items()))}, f, indent=0)
            f.flush()
            os.fsync(f.fileno())


def _writer_of(name: str, world: int) -> int:
    shard = re.match(r"__(\d+)_\d+\.distcp$", name)
    return int(shard.group(1)) % world if shard else 0


@contextlib.contextmanager
def _writes_in_this_process():
    """dist_checkpointing's torch_dist writer (FileSystemWriterAsync) writes its files from
    processes of its own: a results queue served by a multiprocessing Manager (spawned,
    with multiprocessing's resource tracker) and one forked writer per file. A trainer
    killed with kill -9 during a save leaves them running under PID 1. While this is
    active the same writer writes each file from a thread of this process (the Manager's
    queue becomes a thread queue), so nothing outlives the trainer."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    writer = fsa.FileSystemWriterAsync

    def write_in_threads(transform_list, use_msc, rank, write_buckets, results_queue):
        def write(index, bucket):
            results, count = queue.Queue(), queue.Queue()
            count.put(index)  # the writer marks its task done on it
            writer.write_preloaded_data(transform_list, index, bucket, results, count, True)
            return results.get()

        with ThreadPoolExecutor(max_workers=max(1, len(write_buckets)), thread_name_prefix="checkpoint-writer") as pool:
            outputs = list(pool.map(write, range(len(write_buckets)), write_buckets))
        failed = [result for _, result in outputs if isinstance(result, Exception)]
        results_queue.put(failed[0] if failed else dict(outputs))

    with _SAVING:
        original = fsa._get_write_results_queue, writer.__dict__["write_preloaded_data_multiproc"]
        fsa._get_write_results_queue, writer.write_preloaded_data_multiproc = (
            queue.Queue,
            staticmethod(write_in_threads),
        )
        try:
            yield
        finally:
            fsa._get_write_results_queue, writer.write_preloaded_data_multiproc = original


_SAVING = threading.RLock()


# -- one writer per --save directory -------------------------------------------------


@contextlib.contextmanager
def exclusive_save_dir(root: Optional[str]):
    """For the run (every rank enters it): `--save` exists or can be made, can be written,
    and is written by this run only. Rank 0 holds an exclusive flock on DIR/.lock; a second
    run on the same directory stops at once naming the holder. The kernel releases a flock
    when its process dies (kill -9 included), so the lock of a dead run blocks nothing."""
    if not root:
        yield
        return
    lock, error = None, None
    if torch.distributed.get_rank() == 0:
        try:
            lock = _SaveLock(root)
        except CheckpointError as err:
            error = str(err)
    holder = [error]
    torch.distributed.broadcast_object_list(holder, src=0)
    if holder[0] is not None:
        raise CheckpointError(holder[0])
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _file_above(path: str) -> Optional[str]:
    """The nearest existing ancestor of `path` that is not a directory."""
    path = os.path.abspath(path)
    while path != os.path.dirname(path):
        if os.path.lexists(path):
            return None if os.path.isdir(path) else path
        path = os.path.dirname(path)
    return None


class _SaveLock:
    def __init__(self, root: str):
        self.path = os.path.join(root, LOCK_FILE)
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as err:
            blocker = _file_above(root)
            why = f"{blocker} is a file, not a directory" if blocker else f"cannot create it ({err.strerror})"
            raise CheckpointError(f"--save {root}: {why}") from None
        while True:
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise CheckpointError(f"--save {root} is not writable ({err.strerror})") from None
            if not self._locked(root):
                return
            try:  # the holder removes the file when it ends: lock the file that is there now
                if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            os.close(self.fd)
        record = json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        )
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, record.encode(), 0)

    def _locked(self, root: str) -> bool:
        """Take the lock; False where the file system has no locks (the run goes on unlocked)."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            holder = _holder(self.fd)
            os.close(self.fd)
            raise CheckpointError(
                f"--save {root} is in use by another run ({holder}): one run at a time writes to a --save directory"
            ) from None
        except OSError as err:
            print(
                f"warning: --save {root}: cannot lock {self.path} ({err.strerror}); another run could write to "
                "this directory at the same time",
                flush=True,
            )
            return False

    def release(self) -> None:
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                os.unlink(self.path)
        os.close(self.fd)  # releases the flock


def _holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"PID {record['pid']} on host {record['host']}, since {record['since']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "a process that has not written its PID yet"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def verify_on_all_ranks(path: str) -> None:
    """The checksums of the checkpoint at `path`, each rank reading its share of the
    files; every rank raises the same error."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    every = [None] * world
    torch.distributed.all_gather_object(every, checksum_problems(path, (rank, world)))
    problems = sorted({problem for part in every for problem in part})
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(problems[0] + more)


def load(config, model, optimizer, scheduler, checksums: bool = True) -> Tuple[int, int]:
    """`--load` of the run `config`: weights, and unless told otherwise optimizer, scheduler
    and RNG; returns (iteration, consumed samples). --finetune reads weights only, starts at 0."""
    ckpt = config.checkpoint
    path = resolve(ckpt.load, ckpt.load_iteration, checksums=False)
    if checksums:
        verify_on_all_ranks(path)
    common = read_common(path)
    stored = read_model_config(path)
    new_exits = compare_with_checkpoint(
        stored, _compared_model(stored, _unwrap(model).model_config, config.model.num_layers, path)
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
                "with the same --pipeline-model-parallel-size and --tune-exit-pipeline-parallel-size, or put its "
                "exits back on the whole model with tools/checkpoint/add_exits.py --exits-from"
            )
        return built
    return dataclasses.replace(built, num_layers=num_layers, first_stages_only=False)


def _load_state(ckpt, model, optimizer, scheduler, path, common, new_exits, weights_only) -> Tuple[int, int]:
    rank0 = torch.distributed.get_rank() == 0
    model_sd, model_state, skipped = _model_state(model, new_exits)
    state = {"model": model_state}
    if not weights_only:
        _materialise_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=optimizer_metadata(optimizer)
        )
    same_layout = tuple(common.get("layout", ())) == _layout()
    # RNG states are saved with the optimizer state (full saves only), one per rank of the layout.
    load_rng = not (ckpt.finetune or ckpt.no_load_rng) and common.get("has_optimizer", True) and same_layout
    if not same_layout and not (ckpt.finetune or ckpt.no_load_rng) and rank0:
        print(
            f" checkpoint layout (TP, PP, DP) = {tuple(common.get('layout', ()))}, now {_layout()}: "
            "weights and optimizer are resharded, RNG states are not restored",
            flush=True,
        )
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
