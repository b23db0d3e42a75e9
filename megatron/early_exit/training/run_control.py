"""When a run stops before --train-iters: --exit-interval, --exit-duration-in-mins and
--exit-signal-handler (Megatron-LM's meanings).

A scheduler about to preempt a job sends SIGTERM. With --exit-signal-handler the handler
only records it; the iteration under way finishes, and at its end every rank learns (one
all-reduce of the flags, MAX) whether any rank was signalled or ran out of time, so that
all of them save the same checkpoint at once (before any validation due at that iteration)
and leave together with exit status 0. torchrun, when it is signalled too, passes SIGTERM
on to the workers, kills them after its shutdown timeout (launcher.py; the run says how
long at start) and exits 1 itself (docs/training.md).
"""

from __future__ import annotations

import signal
import time
from typing import Optional

import torch


class SignalFlag:
    """Records a signal instead of dying of it, until `restore`."""

    def __init__(self, sig: int = signal.SIGTERM):
        self.sig, self.received = sig, False
        self._previous = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def restore(self) -> None:
        signal.signal(self.sig, self._previous)


class RunControl:
    """Decides, at the end of each iteration, whether the run stops there and why."""

    def __init__(
        self,
        exit_interval: Optional[int],
        exit_duration_in_mins: Optional[float],
        exit_signal_handler: bool,
        device: torch.device,
        start_time: Optional[float] = None,
    ):
        """The flags of the same names; `start_time`: when the run started (default now)."""
        self.exit_interval = exit_interval
        self.duration_s = exit_duration_in_mins * 60 if exit_duration_in_mins is not None else None
        self.device = device
        self.start = time.time() if start_time is None else start_time
        self.signal = SignalFlag() if exit_signal_handler else None

    def stop_reason(self, iteration: int) -> Optional[str]:
        """Why every rank stops after `iteration`, or None (the same answer on every rank)."""
        if self.exit_interval and iteration % self.exit_interval == 0:
            return f"--exit-interval {self.exit_interval}"
        if self.signal is None and self.duration_s is None:
            return None
        flags = torch.tensor(
            [
                float(self.signal is not None and self.signal.received),
                float(self.duration_s is not None and time.time() - self.start > self.duration_s),
            ],
            device=self.device,
        )
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        if flags[0] > 0:
            return "SIGTERM received (--exit-signal-handler)"
        if flags[1] > 0:
            return f"--exit-duration-in-mins {self.duration_s / 60:g} elapsed"
        return None

    def close(self) -> None:
        if self.signal is not None:
            self.signal.restore()
