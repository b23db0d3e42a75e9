"""Run a plan: the one executor behind every schedule (no pipelining, 1F1B, bubble
filling, exit tuning, forward-only evaluation).

Every schedule keeps one contract:

    forward_step(data_iterator, model) -> (output, loss_func)
    loss_func(output) -> (scalar loss, LossReport)

`loss_func` is where exit heads run (lazily), so the executor calls it right
before the backward of its microbatch. A stage with exits back-propagates
`loss + <output, gradient from the next stage>` in one backward call: no extra
communication for exit losses (EE-LLM's lightweight method).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch

from megatron.early_exit.loss import LossReport
from megatron.early_exit.pipeline.p2p import StageLinks
from megatron.early_exit.pipeline.plan import Action, Item, executor_steps, pipeline_plan


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def run_schedule(
    actions: List[Action],
    forward_step: Callable,
    batches: Dict[Item, Any],
    model: torch.nn.Module,
    num_microbatches: int,
    links: Optional[StageLinks] = None,
    forward_only: bool = False,
    loss_scale: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> List[LossReport]:
    """Execute one stage's actions. Losses are divided by the number of real
    microbatches (fill items included), and multiplied by `loss_scale` (fp16)
    before backward. Returns the reports of the real microbatches, in order.
    Communication follows `executor_steps`: at each action boundary one batch (the
    send just produced with the receives due next), then the waits the next action needs."""
    steps = executor_steps(links.stage if links is not None else 0, actions)
    in_flight: Dict[Item, tuple] = {}
    reports: Dict[int, LossReport] = {}
    _communicate(links, steps[0], None)
    for i, action in enumerate(actions):
        incoming = links.take(action.message) if action.recv else None
        if action.kind == "F":
            outgoing = _forward(action, incoming, forward_step, batches, model, forward_only, in_flight, reports)
        else:
            x, output, loss_func = in_flight.pop(action.item)
            loss, report = loss_func(output)  # exit heads run here
            if action.item[0] == "R":
                reports[action.item[1]] = report
            _backward(loss / num_microbatches, output.hidden_states, incoming, loss_scale)
            outgoing = (x.grad if x.grad is not None else torch.zeros_like(x)) if action.send else None
        _communicate(links, steps[i + 1], outgoing)
    assert not in_flight, f"plan left forwards without backward: {list(in_flight)}"
    return [reports[j] for j in sorted(reports)]


def _communicate(links: Optional[StageLinks], step, tensor: Optional[torch.Tensor]) -> None:
    post, wait = step
    if links is not None:
        links.post(post, tensor)
        if wait:
            links.wait(wait)


def _forward(action, x, forward_step, batches, model, forward_only, in_flight, reports) -> Optional[torch.Tensor]:
    """Run one forward; keeps what its backward needs and returns what it sends on."""
    build_graph = action.graph and not forward_only
    if x is not None and build_graph:
        x.requires_grad_(True)
    _unwrap(model).set_input_tensor(x)
    with torch.set_grad_enabled(build_graph):
        output, loss_func = forward_step(iter([batches[action.item]]), model)
    # No graph: a cool-down fill item whose backward stops before this stage.
    if action.graph and forward_only:
        with torch.no_grad():
            _, report = loss_func(output)
        if action.item[0] == "R":
            reports[action.item[1]] = report
    elif action.graph:
        in_flight[action.item] = (x, output, loss_func)
    return output.hidden_states if action.send else None


def _backward(loss, output, output_grad, loss_scale) -> None:
    roots, grads = [], []
    if loss.requires_grad:
        roots.append(loss_scale(loss) if loss_scale is not None else loss)
        grads.append(None)
    if output_grad is not None:
        roots.append(output)
        grads.append(output_grad)
    if roots:
        torch.autograd.backward(roots, grads)


def forward_backward_no_pipelining(
    forward_step: Callable,
    data_iterator,
    model: torch.nn.Module,
    num_microbatches: int,
    forward_only: bool = False,
    loss_scale: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> List[LossReport]:
    """One stage: every microbatch forward then backward, accumulating gradients."""
    batches = {("R", j): next(data_iterator) for j in range(num_microbatches)}
    actions = pipeline_plan(1, num_microbatches)[0]
    if forward_only:
        actions = [a for a in actions if a.kind == "F"]
    return run_schedule(actions, forward_step, batches, model, num_microbatches, None, forward_only, loss_scale)
