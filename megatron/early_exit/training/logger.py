"""Training metrics to stdout (Megatron-LM's line format) and the trackers (TensorBoard, wandb)."""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from megatron.core import parallel_state

from megatron.early_exit.loss import LossReport


def average_reports(reports: List[LossReport]) -> Dict[str, float]:
    """Mean over microbatches and data-parallel ranks of `lm loss`, `early loss [L]`,
    `distill loss [L]` (self-distillation), plus `exit weight [L]`. Keys are in
    Megatron-LM/EE-LLM's logging names."""
    names, values, weights = [], [], {}
    if reports and reports[0].lm_loss is not None:
        names.append("lm loss")
        values.append(torch.stack([r.lm_loss for r in reports]).mean())
    for layer in sorted(reports[0].exit_losses) if reports else []:
        names.append(f"early loss [{layer}]")
        values.append(torch.stack([r.exit_losses[layer] for r in reports]).mean())
        weights[f"exit weight [{layer}]"] = reports[0].exit_weights[layer]
    for layer in sorted(reports[0].distill_losses) if reports else []:
        names.append(f"distill loss [{layer}]")
        values.append(torch.stack([r.distill_losses[layer] for r in reports if layer in r.distill_losses]).mean())
    if not values:
        return dict(weights)
    stacked = torch.stack(values).float()
    if parallel_state.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(stacked, group=parallel_state.get_data_parallel_group())
        stacked /= parallel_state.get_data_parallel_world_size()
    out = {name: float(v) for name, v in zip(names, stacked)}
    out.update(weights)
    return out


class MetricsLogger:
    def __init__(self, tensorboard_dir: Optional[str], enabled: bool, writer=None):
        """`writer`: where scalars go (trackers.Trackers); default a TensorBoard writer of
        `tensorboard_dir`, if given."""
        self.enabled = enabled
        self.writer = writer
        if enabled and tensorboard_dir and writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)

    def training(self, iteration: int, train_iters: int, metrics: Dict[str, float], extra: Dict[str, float]) -> None:
        if not self.enabled:
            return
        parts = [f" iteration {iteration:8d}/{train_iters:8d}"]
        parts += [f"{k}: {_fmt(v, k)}" for k, v in extra.items()]
        parts += [f"{k}: {_fmt(v, k)}" for k, v in metrics.items()]
        print(" | ".join(parts), flush=True)
        if self.writer:
            for k, v in {**metrics, **extra}.items():
                if not isinstance(v, str):
                    self.writer.add_scalar(f"train/{k}", v, iteration)
            self.writer.flush()

    def validation(self, iteration: int, metrics: Dict[str, float], split: str = "validation") -> None:
        if not self.enabled:
            return
        parts = [f" {split} loss at iteration {iteration}"]
        for k, v in metrics.items():
            parts.append(f"{k}: {_fmt(v)}")
            if "loss" in k:
                parts.append(f"{k} PPL: {_fmt(math.exp(min(v, 20.0)))}")
        line = " | ".join(parts)
        print("-" * len(line) + "\n" + line + "\n" + "-" * len(line), flush=True)
        if self.writer:
            for k, v in metrics.items():
                self.writer.add_scalar(f"{split}/{k}", v, iteration)
            self.writer.flush()

    def close(self):
        if self.writer:
            self.writer.close()


# Printed in one notation whatever their size (a learning rate decays across the switch).
SCIENTIFIC = ("learning rate",)


def _fmt(v, key: str = "") -> str:
    if isinstance(v, (int, str)):
        return str(v)
    if key in SCIENTIFIC:
        return f"{v:.6E}"
    return f"{v:.6E}" if abs(v) >= 1e4 or (0 < abs(v) < 1e-3) else f"{v:.4f}"


def time_left(seconds_per_iteration: float, iterations_left: int) -> str:
    """The estimated time to the last iteration, as 1h 05m, 12m 30s or 40s."""
    seconds = int(round(max(seconds_per_iteration, 0.0) * max(iterations_left, 0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"
