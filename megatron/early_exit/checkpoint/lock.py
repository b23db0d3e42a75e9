"""One writing run per checkpoint root: rank 0 holds an exclusive flock on `DIR/.lock`."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from typing import Optional

import torch

from megatron.early_exit.checkpoint.errors import CheckpointError

LOCK_FILE = ".lock"


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
