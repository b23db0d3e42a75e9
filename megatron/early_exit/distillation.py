"""Exit self-distillation: each exit learns the final layer's distribution, not only the labels.

An exit's training loss becomes `(1 - a) * CE(exit, labels) + a * T^2 * KL(p_final || p_exit)`
with p = softmax(logits / T), `a` = --exit-distill-weight (warmed up over
--exit-distill-warmup-iters) and T = --exit-distill-temperature. The final layer is the
teacher: its logits are detached, so distillation moves the exits only. An exit that
agrees with the final layer is what early-exit decoding needs (its confidence then
predicts agreement, and its tokens match full depth).

Logits are vocab-parallel ([s, b, v/tp] on each tensor-parallel rank); the KL is computed
with two all-reduces per softmax (the teacher's once per microbatch, shared by its exits)
and one for the sum, as megatron-core computes its cross-entropy, and its gradient
T * (p_exit - p_final) is local to each shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Distillation:
    """What an exit's loss needs to distil from the final layer: the teacher's distribution,
    computed once per microbatch for all its exits (`teacher_log_probs`)."""

    teacher_log_probs: Tensor  # log softmax(final logits / T) over the whole vocabulary, vocab-parallel [s, b, v/tp]
    temperature: float


def _tp():
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
        return parallel_state.get_tensor_model_parallel_group()
    return None


def _log_softmax(logits: Tensor, group) -> Tensor:
    """log softmax over the whole vocabulary of vocab-parallel fp32 logits."""
    m = logits.max(dim=-1, keepdim=True).values
    if group is not None:
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
    shifted = logits - m
    sum_exp = shifted.exp().sum(dim=-1, keepdim=True)
    if group is not None:
        torch.distributed.all_reduce(sum_exp, group=group)
    return shifted - sum_exp.log()


def teacher_log_probs(teacher_logits: Tensor, temperature: float) -> Tensor:
    """The detached teacher's log softmax(logits / T), vocab-parallel fp32 [s, b, v/tp]."""
    with torch.no_grad():
        return _log_softmax(teacher_logits.float() / temperature, _tp())


class _VocabParallelKL(torch.autograd.Function):
    """T^2 * KL(p_teacher || softmax(student/T)) per token: [s, b, v/tp] -> [s, b]."""

    @staticmethod
    def forward(ctx, student: Tensor, log_teacher: Tensor, temperature: float) -> Tensor:
        group = _tp()
        log_student = _log_softmax(student.float() / temperature, group)
        p_teacher = log_teacher.exp()
        kl = (p_teacher * (log_teacher - log_student)).sum(dim=-1)
        if group is not None:
            torch.distributed.all_reduce(kl, group=group)
        ctx.save_for_backward(log_student.exp(), p_teacher)
        ctx.temperature = temperature
        ctx.student_dtype = student.dtype
        return kl * temperature**2

    @staticmethod
    def backward(ctx, grad: Tensor):
        p_student, p_teacher = ctx.saved_tensors
        # d(T^2 KL)/d student = T^2 * (p_s - p_t) / T
        grad_student = (p_student - p_teacher) * (ctx.temperature * grad.unsqueeze(-1))
        return grad_student.to(ctx.student_dtype), None, None


def distillation_loss(student_logits: Tensor, distill: Distillation) -> Tensor:
    """Per-token distillation loss [b, s] of vocab-parallel student logits [s, b, v/tp]."""
    return _VocabParallelKL.apply(student_logits, distill.teacher_log_probs, float(distill.temperature)).transpose(0, 1)
