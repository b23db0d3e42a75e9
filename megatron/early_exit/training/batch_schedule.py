"""How long a run trains and how its learning rate moves: iterations or samples.

Megatron-LM's two ways to size a run: `--train-iters` (with `--lr-decay-iters`,
`--lr-warmup-iters`, `--lr-wsd-decay-iters`) counts optimizer steps; `--train-samples`
(with the `*-samples` flags and optionally `--rampup-batch-size`) counts samples, and the
scheduler then steps by the global batch size of each iteration. `--lr-warmup-fraction`
takes the warm-up as a fraction of the decay, in either unit. Batch-size ramp-up is
megatron-core's RampupBatchsizeNumMicroBatchesCalculator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator

from megatron.early_exit.errors import ConfigError


@dataclass(frozen=True)
class SchedulerSteps:
    """Lengths of the LR/WD schedule in the scheduler's unit (iterations or samples)."""

    warmup: int
    decay: int
    wsd_decay: Optional[int]
    total: int
    in_samples: bool  # each iteration steps the scheduler by its global batch size


def rampup_calculator(
    rampup_batch_size, global_batch_size: int, micro_batch_size: int, data_parallel_size: int, rank: int = 0
) -> Optional[RampupBatchsizeNumMicroBatchesCalculator]:
    """megatron-core's calculator of --rampup-batch-size (start, increment, samples); None without it."""
    if rampup_batch_size is None:
        return None
    start, increment, samples = rampup_batch_size
    return RampupBatchsizeNumMicroBatchesCalculator(
        global_batch_size, micro_batch_size, data_parallel_size, False, rank, start, increment, samples
    )


def iterations_for_samples(
    train_samples: int, rampup_batch_size, global_batch_size: int, micro_batch_size: int, data_parallel_size: int
) -> int:
    """Iterations that consume --train-samples (Megatron-LM's count: whole batches)."""
    calculator = rampup_calculator(rampup_batch_size, global_batch_size, micro_batch_size, data_parallel_size)
    if calculator is None:
        return train_samples // global_batch_size
    consumed, iterations = 0, 0
    while consumed <= rampup_batch_size[2] and consumed < train_samples:
        calculator.update(consumed, consistency_check=False)
        consumed += calculator.get_current_global_batch_size()
        iterations += 1
    return iterations + max(train_samples - consumed, 0) // global_batch_size


def scheduler_steps(training) -> SchedulerSteps:
    """The schedule's warm-up, decay and WSD decay lengths, defaults filled, of a
    run_config.TrainingConfig (its run-length fields are the flags' names)."""
    in_samples = training.train_samples is not None
    unit = "samples" if in_samples else "iters"
    total = training.train_samples if in_samples else training.train_iters
    decay = getattr(training, f"lr_decay_{unit}") or total
    warmup = getattr(training, f"lr_warmup_{unit}") or 0
    if training.lr_warmup_fraction is not None:
        warmup = int(training.lr_warmup_fraction * decay)
    if warmup and warmup >= decay:
        raise ConfigError(f"--lr-warmup-{unit} ({warmup}) must be smaller than --lr-decay-{unit} ({decay})")
    return SchedulerSteps(warmup, decay, getattr(training, f"lr_wsd_decay_{unit}"), total, in_samples)
