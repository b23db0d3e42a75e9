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


def validate_run_length(args) -> None:
    """Megatron-LM's rules: one unit per run, ramp-up only by samples."""
    if (args.train_iters is None) == (args.train_samples is None):
        raise ConfigError("give one of --train-iters and --train-samples")
    unit, other = ("samples", "iters") if args.train_samples is not None else ("iters", "samples")
    for name in ("lr_decay", "lr_wsd_decay"):
        if getattr(args, f"{name}_{other}") is not None:
            raise ConfigError(f"--{name.replace('_', '-')}-{other} needs --train-{other} (this run counts {unit})")
    if getattr(args, f"lr_warmup_{other}"):
        raise ConfigError(f"--lr-warmup-{other} needs --train-{other} (this run counts {unit})")
    if args.lr_warmup_fraction is not None:
        if getattr(args, f"lr_warmup_{unit}"):
            raise ConfigError(f"give one of --lr-warmup-fraction and --lr-warmup-{unit}")
        if not 0.0 <= args.lr_warmup_fraction < 1.0:
            raise ConfigError(f"--lr-warmup-fraction must be in [0, 1), got {args.lr_warmup_fraction}")
    if args.rampup_batch_size is not None and args.train_samples is None:
        raise ConfigError("--rampup-batch-size needs --train-samples (ramp-up is counted in samples)")
    value = args.train_iters if args.train_samples is None else args.train_samples
    if value < 1:
        raise ConfigError(f"--train-{unit} must be >= 1, got {value}")


def validate_rampup(args) -> None:
    """--rampup-batch-size START INCREMENT SAMPLES: every batch size on the way must split
    into micro batches of every data-parallel rank."""
    if args.rampup_batch_size is None:
        return
    start, increment, samples = args.rampup_batch_size
    per_step = args.micro_batch_size * args.data_parallel_size
    if start < 1 or increment < 1 or samples < 0:
        raise ConfigError(f"--rampup-batch-size {start} {increment} {samples}: start and increment must be >= 1")
    if start > args.global_batch_size or (args.global_batch_size - start) % increment:
        raise ConfigError(
            f"--rampup-batch-size {start} {increment} {samples}: --global-batch-size "
            f"({args.global_batch_size}) must be start + a multiple of the increment"
        )
    if start % per_step or increment % per_step:
        raise ConfigError(
            f"--rampup-batch-size {start} {increment} {samples}: start and increment must be multiples "
            f"of --micro-batch-size x data-parallel size ({per_step})"
        )


def rampup_calculator(args, rank: int = 0) -> Optional[RampupBatchsizeNumMicroBatchesCalculator]:
    if args.rampup_batch_size is None:
        return None
    start, increment, samples = args.rampup_batch_size
    return RampupBatchsizeNumMicroBatchesCalculator(
        args.global_batch_size, args.micro_batch_size, args.data_parallel_size, False, rank, start, increment, samples
    )


def iterations_for_samples(args) -> int:
    """Iterations that consume --train-samples (Megatron-LM's count: whole batches)."""
    calculator = rampup_calculator(args)
    if calculator is None:
        return args.train_samples // args.global_batch_size
    consumed, iterations = 0, 0
    while consumed <= args.rampup_batch_size[2] and consumed < args.train_samples:
        calculator.update(consumed, consistency_check=False)
        consumed += calculator.get_current_global_batch_size()
        iterations += 1
    return iterations + max(args.train_samples - consumed, 0) // args.global_batch_size


def scheduler_steps(args) -> SchedulerSteps:
    """The schedule's warm-up, decay and WSD decay lengths, defaults filled."""
    in_samples = args.train_samples is not None
    unit = "samples" if in_samples else "iters"
    total = args.train_samples if in_samples else args.train_iters
    decay = getattr(args, f"lr_decay_{unit}") or total
    warmup = getattr(args, f"lr_warmup_{unit}") or 0
    if args.lr_warmup_fraction is not None:
        warmup = int(args.lr_warmup_fraction * decay)
    if warmup and warmup >= decay:
        raise ConfigError(f"--lr-warmup-{unit} ({warmup}) must be smaller than --lr-decay-{unit} ({decay})")
    return SchedulerSteps(warmup, decay, getattr(args, f"lr_wsd_decay_{unit}"), total, in_samples)
