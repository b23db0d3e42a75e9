"""Run a plan: the one executor behind every schedule (no pipelining, 1F1B, bubble
filling, exit tuning, forward-only evaluation).

Every schedule keeps one contract:

    forward_step(data_iterator, model) -> (output, loss_func)
    loss_func(output) -> (scalar loss, LossReport)

`loss_func` is where exit heads run (lazily), so the executor calls it right
before the backward of its microbatch. A stage with exits back-propagates
`loss + <output, gradient from the next stage>` in one backward call: no extra
communication for exit losses (EE-LLM's lightweight method).

Gradient reduction: every backward but the stage's last runs under the DDP wrapper's
`no_sync`, as megatron-core's schedules do, so that with --overlap-grad-reduce the
buckets are reduced while the last backward runs (and finished by finalize_model_grads).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Union

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
    model: Union[torch.nn.Module, List[torch.nn.Module]],
    num_microbatches: int,
    links: Optional[StageLinks] = None,
    forward_only: bool = False,
    loss_scale: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> List[LossReport]:
    """Execute one stage's actions. Losses are divided by the number of real
    microbatches (fill items included), and multiplied by `loss_scale` (fp16)
    before backward. Returns the reports of the real microbatches, in order.
    `model`: the stage's model, or its model chunks (interleaved plans: each action
    names its chunk; a microbatch's report gathers the losses of every chunk).
    Communication follows `executor_steps`: at each action boundary one batch (the
    send just produced with the receives due next), then the waits the next action needs."""
    stage = links.stage if links is not None else 0
    steps = executor_steps(stage, actions)
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    in_flight: Dict[tuple, tuple] = {}  # (chunk, item) -> what its backward needs
    reports: Dict[int, LossReport] = {}
    outbox: Dict[tuple, torch.Tensor] = {}  # sends of actions whose batch is not posted yet
    last_backward = {a.chunk: i for i, a in enumerate(actions) if a.kind == "B"}
    _communicate(links, steps[0], outbox)
    for i, action in enumerate(actions):
        chunk = chunks[action.chunk]
        incoming = links.take(action.label(stage, False)) if action.recv else None
        if action.kind == "F":
            outgoing = _forward(action, incoming, forward_step, batches, chunk, forward_only, in_flight, reports)
        else:
            x, output, loss_func = in_flight.pop((action.chunk, action.item))
            loss, report = loss_func(output)  # exit heads run here
            if action.item[0] == "R":
                _add_report(reports, action.item[1], report)
            with _grad_sync(chunk, i == last_backward[action.chunk]):
                _backward(loss / num_microbatches, output.hidden_states, incoming, loss_scale)
            outgoing = (x.grad if x.grad is not None else torch.zeros_like(x)) if action.send else None
        if outgoing is not None:
            outbox[action.label(stage, True)] = outgoing
        _communicate(links, steps[i + 1], outbox)
    assert not in_flight, f"plan left forwards without backward: {list(in_flight)}"
    return [reports[j] for j in sorted(reports)]


def _add_report(reports: Dict[int, LossReport], j: int, report: LossReport) -> None:
    """Chunks of one stage each report their own exits (and the last one the final loss)."""
    if j not in reports:
        reports[j] = report
        return
    merged = reports[j]
    merged.lm_loss = merged.lm_loss if report.lm_loss is None else report.lm_loss
    merged.exit_losses.update(report.exit_losses)
    merged.exit_weights.update(report.exit_weights)
    merged.distill_losses.update(report.distill_losses)


def _grad_sync(model, enabled: bool):
    """Gradient reduction waits for the last backward of the step (DDP wrappers only)."""
    no_sync = getattr(model, "no_sync", None)
    return nullcontext() if enabled or no_sync is None else no_sync()


def _communicate(links: Optional[StageLinks], step, outbox: Dict[tuple, torch.Tensor]) -> None:
    post, wait = step
    sends = {op.message: outbox.pop(op.message) for op in post.ops if op.send}
    if links is not None:
        links.post(post, sends)
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
            _add_report(reports, action.item[1], report)
    elif action.graph:
        in_flight[(action.chunk, action.item)] = (x, output, loss_func)
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
