"""The early-exit training loss: `final + sum_i w_i(t) * exit_i`, each a masked token mean.

With self-distillation (distillation.py) an exit's term is `(1-a) CE + a T^2 KL(final || exit)`.

Exit heads are evaluated here, lazily: `early_exit_loss` is called right before
the backward of its microbatch, so exit logits never outlive it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import Tensor

from megatron.early_exit.config import EarlyExitConfig
from megatron.early_exit.distillation import Distillation, teacher_log_probs
from megatron.early_exit.models.early_exit_gpt import EarlyExitOutput


def masked_token_mean(token_loss: Tensor, loss_mask: Tensor) -> Tensor:
    """Mean of a [b, s] per-token loss over the tokens the mask keeps."""
    mask = loss_mask.to(token_loss.dtype)
    return (token_loss * mask).sum() / mask.sum().clamp(min=1.0)


@dataclass
class LossReport:
    """Detached values for logging: `lm loss`, `early loss [L]` (cross-entropy), `exit weight [L]`,
    and with self-distillation `distill loss [L]` (T^2 KL from the final layer)."""

    lm_loss: Optional[Tensor] = None
    exit_losses: Dict[int, Tensor] = field(default_factory=dict)
    exit_weights: Dict[int, float] = field(default_factory=dict)
    distill_losses: Dict[int, Tensor] = field(default_factory=dict)


def early_exit_loss(
    output: EarlyExitOutput,
    loss_mask: Tensor,
    ee_config: EarlyExitConfig,
    iteration: int,
    zero_weight_gradients: bool = False,
) -> tuple[Tensor, LossReport]:
    """Scalar loss of one microbatch on one stage, and what to log.

    On a stage without the output layer only the exit terms appear. An exit whose
    weight is 0 at this iteration (warm-up from 0, curriculum) is evaluated without
    gradient, for logging only; with `zero_weight_gradients` it back-propagates zeros
    instead, as megatron-core's DDP needs under --overlap-grad-reduce: a bucket waits for a
    gradient of every parameter it holds (the count its first iteration recorded).
    """
    report = LossReport()
    total = None
    if output.final is not None:
        total = masked_token_mean(output.final.float(), loss_mask)
        report.lm_loss = total.detach()
    weights = dict(zip(ee_config.exit_layer_nums, ee_config.exit_weights(iteration)))
    share = ee_config.distill_weight(iteration)
    distill = None
    if output.teacher_logits is not None and ee_config.exit_distill_weight > 0:
        temperature = ee_config.exit_distill_temperature
        distill = Distillation(teacher_log_probs(output.teacher_logits, temperature), temperature)
    for pending in output.exits:
        weight = weights[pending.layer_number]
        report.exit_weights[pending.layer_number] = weight
        with torch.set_grad_enabled(torch.is_grad_enabled() and (weight != 0.0 or zero_weight_gradients)):
            token_loss, confidence, kl = pending.compute_loss(ee_config.use_dynamic_exit_layer_weight, distill)
            token_loss = token_loss.float()
            report.exit_losses[pending.layer_number] = masked_token_mean(token_loss, loss_mask).detach()
            if kl is not None:
                kl = kl.float()
                report.distill_losses[pending.layer_number] = masked_token_mean(kl, loss_mask).detach()
                token_loss = (1.0 - share) * token_loss + share * kl
            if weight == 0.0 and not zero_weight_gradients:
                continue
            if confidence is not None:
                token_loss = token_loss * confidence
            term = weight * masked_token_mean(token_loss, loss_mask)
        total = term if total is None else total + term
    if total is None:  # a stage with neither exits nor the output layer
        total = output.hidden_states.new_zeros(())
    return total, report
