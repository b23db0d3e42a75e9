"""The state a model decodes in: `inference_context(model)` (eval mode, no autograd, the
unfused bias-dropout-add, and at TP=1 megatron-core's tensor-parallel linears as plain
`F.linear` calls), entered by every decoding, scoring and calibration entry point.

Plain linears: with one tensor-parallel rank and no autograd, ColumnParallelLinear and RowParallelLinear
compute exactly `F.linear(x, weight, bias)` (their gather and reduce are identities), but
each call still goes through a custom autograd Function, group lookups and dead-wrapper
checks: about a third of a small model's decode step on CPU. `plain_linears(model)`
swaps their forward for the plain one on this model's instances for the duration of a
`with` block (decoding only; training never sees it) and puts the original back.

On CPU the product runs against a transposed copy of each weight ([in, out], contiguous):
MKL multiplies the few rows of a decode step by a transposed right operand 1.2-1.7x slower
(one thread, weights streamed from memory: [8, 512] x [512, 2816] 990 against 662 us). One
copy per weight (tied heads share it), kept between calls and rebuilt when the weight
changes; it doubles the linear layers' memory while a model decodes on CPU, which
EE_CPU_TRANSPOSED_WEIGHTS=0 avoids.
"""

from __future__ import annotations

import functools
import os
import types
import weakref
from contextlib import contextmanager
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import Tensor

_TRANSPOSED: Dict[int, Tuple[Tuple[int, int], Tensor]] = {}  # id(weight) -> ((data_ptr, version), weight.t())


def transposed(weight: Tensor) -> Tensor:
    """weight.t() as a contiguous tensor, cached per weight until its data changes."""
    key, entry = (weight.data_ptr(), weight._version), _TRANSPOSED.get(id(weight))
    if entry is None or entry[0] != key:
        if entry is None:
            weakref.finalize(weight, _TRANSPOSED.pop, id(weight), None)
        entry = (key, weight.detach().t().contiguous())
        _TRANSPOSED[id(weight)] = entry
    return entry[1]


def _transposed_linear(input_: Tensor, weight: Tensor, bias) -> Tensor:
    out = torch.matmul(input_, transposed(weight))
    return out if bias is None else out + bias


def _column_forward(self, input_, weight=None, runtime_gather_output=None, *, linear):
    weight = self.weight if weight is None else weight
    bias = None if self.skip_bias_add else self.bias
    return linear(input_, weight, bias), (self.bias if self.skip_bias_add else None)


def _row_forward(self, input_, *, linear):
    bias = None if self.skip_bias_add else self.bias
    return linear(input_, self.weight, bias), (self.bias if self.skip_bias_add else None)


@contextmanager
def plain_linears(model):
    swapped = []
    # Chosen once per block: the model's device and EE_CPU_TRANSPOSED_WEIGHTS.
    on_cpu = next(model.parameters()).device.type == "cpu"
    linear = _transposed_linear if on_cpu and os.environ.get("EE_CPU_TRANSPOSED_WEIGHTS", "1") != "0" else F.linear
    column, row = functools.partial(_column_forward, linear=linear), functools.partial(_row_forward, linear=linear)
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        for module in model.modules():
            kind = type(module)
            if "forward" in module.__dict__:  # swapped by an enclosing block (the server steps inside a job)
                continue
            if kind is ColumnParallelLinear and not module.sequence_parallel:
                swapped.append(module)
                module.forward = types.MethodType(column, module)
            elif kind is RowParallelLinear and not module.sequence_parallel:
                swapped.append(module)
                module.forward = types.MethodType(row, module)
    try:
        yield
    finally:
        for module in swapped:
            del module.forward  # back to the class's forward


@contextmanager
def inference_context(model):
    """Eval mode (no dropout) and no autograd, restoring the model's mode afterwards.

    The fused bias-dropout-add is a torch.compile'd function that recompiles for every
    new decode shape (batch and chunk widths change each step); at inference, with no
    dropout, the unfused one computes the same sum. At TP=1 the tensor-parallel linears
    run as plain F.linear calls (`plain_linears`)."""
    was_training, fused = model.training, model.config.bias_dropout_fusion
    model.eval()
    model.config.bias_dropout_fusion = False
    try:
        with torch.no_grad(), plain_linears(model):
            yield
    finally:
        model.train(was_training)
        model.config.bias_dropout_fusion = fused
