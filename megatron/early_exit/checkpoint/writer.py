"""Writing checkpoints: the weights and the model description, published atomically.

A save goes to `iter_XXXXXXX.tmp`, its manifest (checksums.py) is written after its files,
it is renamed when every rank has finished, and only then is the marker updated; a process
killed at any moment leaves the previous checkpoint and marker intact. The files are written
by threads of the saving processes (no helper processes that could outlive them).
Converters write weights-only checkpoints here; training adds its state (optimizer,
scheduler, RNG) in training/checkpointing.py.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import queue
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Optional, Tuple

import torch
from megatron.core import dist_checkpointing, parallel_state

from megatron.early_exit.checkpoint.checksums import write_manifest
from megatron.early_exit.checkpoint.errors import CheckpointError, cause_of_kind
from megatron.early_exit.checkpoint.reader import TRACKER, checkpoint_dir, model_sharded_state, unwrap

CHECKPOINT_VERSION = 2


def parallel_layout() -> Tuple[int, int, int]:
    """(TP, PP, DP) of this run, stored with the checkpoint."""
    return (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    )


def _stored_args(flags: Optional[Mapping[str, Any]], model) -> dict:
    """The run's flags by name (--use-checkpoint-args reads them); a checkpoint written
    without a run (converters) stores its model's as flags."""
    if flags is None:
        return unwrap(model).model_config.to_flags()
    return {k: v for k, v in flags.items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}


def stored_model_config(model, flags: Optional[Mapping[str, Any]], root: str) -> dict:
    """The model's description as stored: tokenizer files inside `root` named relative
    to it, so that a copied or moved checkpoint directory finds them."""
    from megatron.early_exit.models.model_config import ModelConfig

    config = getattr(unwrap(model), "model_config", None) or ModelConfig.from_flags(flags, unwrap(model).vocab_size)
    return {**config.to_dict(), "tokenizer": vars(config.tokenizer.relative_to(root))}


def weights_state(flags, model, iteration: int, consumed_samples: int, root: str, has_optimizer: bool) -> dict:
    """What every checkpoint holds: the model's sharded weights, its description, the run's
    flags (`flags`: their values by name, or None: the model's), layout, iteration and format version.
    A full save (`has_optimizer`) adds the training state to it."""
    return {
        "model": model_sharded_state(model),
        "model_config": stored_model_config(model, flags, root),
        "args": _stored_args(flags, model),
        "layout": parallel_layout(),
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "checkpoint_version": CHECKPOINT_VERSION,
        "has_optimizer": has_optimizer,
    }


def save_weights(root: str, flags: Optional[Mapping[str, Any]], model, iteration: int = 0) -> str:
    """A weights-only checkpoint (no optimizer, scheduler or RNG), e.g. written by a
    converter; training loads it with --finetune or --no-load-optim."""
    return publish(root, iteration, lambda: weights_state(flags, model, iteration, 0, root, has_optimizer=False))


def publish(root: str, iteration: int, build_state, keep_last: Optional[int] = None, checksums: bool = True) -> str:
    """Write the state `build_state()` returns as checkpoint `iteration` under `root`,
    atomically; `keep_last`: remove all but the newest that many afterwards."""
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
        write_manifest(tmp)


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
    os_error = cause_of_kind(err, OSError)
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
