"""megatron-core's tensor-parallel linears as plain `F.linear` calls while decoding at TP=1.

With one tensor-parallel rank and no autograd, ColumnParallelLinear and RowParallelLinear
compute exactly `F.linear(x, weight, bias)` (their gather and reduce are identities), but
each call still goes through a custom autograd Function, group lookups and dead-wrapper
checks: about a third of a small model's decode step on CPU. `plain_linears(model)`
swaps their forward for the plain one on this model's instances for the duration of a
`with` block (decoding only; training never sees it) and puts the original back.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear


def _column_forward(self, input_, weight=None, runtime_gather_output=None):
    weight = self.weight if weight is None else weight
    bias = None if self.skip_bias_add else self.bias
    return F.linear(input_, weight, bias), (self.bias if self.skip_bias_add else None)


def _row_forward(self, input_):
    bias = None if self.skip_bias_add else self.bias
    return F.linear(input_, self.weight, bias), (self.bias if self.skip_bias_add else None)


@contextmanager
def plain_linears(model):
    swapped = []
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        for module in model.modules():
            kind = type(module)
            if kind is ColumnParallelLinear and not module.sequence_parallel:
                swapped.append(module)
                module.forward = types.MethodType(_column_forward, module)
            elif kind is RowParallelLinear and not module.sequence_parallel:
                swapped.append(module)
                module.forward = types.MethodType(_row_forward, module)
    try:
        yield
    finally:
        for module in swapped:
            del module.forward  # back to the class's forward
