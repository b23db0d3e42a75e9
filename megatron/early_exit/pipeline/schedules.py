"""Forward/backward schedules. Every schedule keeps one contract:

    forward_step(data_iterator, model) -> (output, loss_func)
    loss_func(output) -> (scalar loss, LossReport)

`loss_func` is where exit heads run (lazily), so it is called right before the
backward of its microbatch. A schedule returns the LossReports of its microbatches.
"""

from __future__ import annotations

from typing import Callable, Iterator, List, Optional

import torch

from megatron.early_exit.loss import LossReport


def forward_backward_no_pipelining(
    forward_step: Callable,
    data_iterator: Iterator,
    model: torch.nn.Module,
    num_microbatches: int,
    forward_only: bool = False,
    loss_scale: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> List[LossReport]:
    """Run every microbatch forward then backward on one stage, accumulating gradients.

    Each microbatch's loss is divided by `num_microbatches`, so the accumulated
    gradient is that of the mean loss over the global batch (data-parallel ranks
    are averaged by DDP). `loss_scale` multiplies the loss before backward (fp16),
    exit terms included.
    """
    reports = []
    for _ in range(num_microbatches):
        with torch.set_grad_enabled(not forward_only):
            output, loss_func = forward_step(data_iterator, model)
            loss, report = loss_func(output)
        reports.append(report)
        if not forward_only and loss.requires_grad:
            loss = loss / num_microbatches
            (loss_scale(loss) if loss_scale is not None else loss).backward()
    return reports
