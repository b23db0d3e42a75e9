"""Counting host-device synchronisations without a GPU.

On a GPU a host reads a device value (`.tolist()`, `.item()`, `bool(t)`, `nonzero`,
`.cpu()`) only by waiting for every queued kernel, and a blocking copy of host data to
the device (`torch.tensor(list, device=...)`, `.to(device)` without `non_blocking`)
waits as well, and so does indexing a device tensor with a Python list or a numpy array
(`x[-1:, cols]`: torch builds the index on the host and copies it over, blocking). On CPU
nothing waits, but the calls are the same: a TorchFunctionMode sees every one of them, in
our code and in megatron-core's, and counts it.
"""

from collections import Counter

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy"}
FACTORIES = {"tensor", "as_tensor"}
INDEXING = {"__getitem__", "__setitem__"}


def _device_of(args, kwargs):
    for value in list(args[1:]) + [kwargs.get("device")]:
        if isinstance(value, (torch.device, str)) and not isinstance(value, bool):
            try:
                return torch.device(value)
            except (RuntimeError, TypeError):
                continue
    return None


def _host_index(index) -> bool:
    """Whether an index holds a Python list or numpy array (copied to the device to index)."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, (list, np.ndarray)) for p in parts)


class SyncCounter(TorchFunctionMode):
    """Counts the calls that synchronise the host with a device, by kind."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self.blocking_moves = []  # data_ptr of each tensor moved by a blocking .to(device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in READS:
            self.counts[name] += 1
        elif name in FACTORIES and kwargs.get("device") is not None:
            self.counts[f"{name}(device=)"] += 1
        elif name in INDEXING and _host_index(args[1]):
            self.counts[f"{name}[list]"] += 1
        elif name == "to" and not kwargs.get("non_blocking", False) and _device_of(args, kwargs) is not None:
            self.counts["to(device)"] += 1
            self.blocking_moves.append(args[0].data_ptr())
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())
