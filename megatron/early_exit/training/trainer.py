"""The pretraining loop: build, wrap, train, evaluate, save.

Order of set-up (each step in one function below):
  1. parallel state and seeds           initialize_parallel
  2. tokenizer and datasets             build_tokenizer, build_datasets
  3. model, layout-invariant init       build_model
  4. freezing for exit tuning           apply_exit_tuning
  5. DDP wrapping                       wrap_model
  6. optimizer and LR/WD scheduler      build_optimizer
  7. checkpoint load                    checkpointing.load

Before any of 2-7, `--save` is checked (writable, no other run writing to it) and locked for
the run. A NaN or Inf loss (final or exit) or gradient norm stops the run at once, before
anything of that state is saved.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Optional

import torch

from megatron.core import parallel_state
from megatron.core import num_microbatches_calculator as microbatches
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron.early_exit.errors import EarlyExitError
from megatron.early_exit.loss import early_exit_loss
from megatron.early_exit.models.early_exit_gpt import EarlyExitGPTModel
from megatron.early_exit.models import builder
from megatron.early_exit.models.model_config import ModelConfig
from megatron.early_exit.parallel import allreduce_tied_embedding_grads, initialize_parallel
from megatron.early_exit.pipeline.p2p import StageLinks
from megatron.early_exit.pipeline.placement import exit_stages, tied_embedding_stages
from megatron.early_exit.pipeline.plan import (
    build_fill_plan,
    check_plan,
    default_num_fill_microbatches,
    exit_tuning_plan,
    pipeline_plan,
)
from megatron.early_exit.pipeline.schedules import run_schedule
from megatron.early_exit.training import checkpointing
from megatron.early_exit.models.model_config import padded_vocab_size
from megatron.early_exit.training.arguments import build_early_exit_config
from megatron.early_exit.training.data import build_data_iterator, build_datasets
from megatron.early_exit.training.logger import MetricsLogger, average_reports
from megatron.early_exit.tokenizers import build_tokenizer


class NonFiniteError(EarlyExitError):
    """A loss or gradient norm that is NaN or Inf: the run stops before saving that state."""


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    history: List[Dict[str, float]] = field(default_factory=list)  # one entry per iteration
    validation: List[Dict[str, float]] = field(default_factory=list)
    model: Optional[torch.nn.Module] = None  # the trained (DDP-wrapped) model, for callers and tests


def model_config_of(args, vocab_size: int) -> ModelConfig:
    """The description of the model the flags train."""
    return ModelConfig.from_flags(vars(args), padded_vocab_size=vocab_size)


def build_model(args, device: torch.device, vocab_size: int) -> EarlyExitGPTModel:
    """The model of the flags on this rank (layout from the parallel state)."""
    return builder.build_model(
        model_config_of(args, vocab_size), device, seed=args.seed, transformer_impl=getattr(args, "transformer_impl", None),
        sequence_parallel=args.sequence_parallel, document_mask=getattr(args, "reset_attention_mask", False),
    )


def apply_exit_tuning(model: EarlyExitGPTModel, args) -> None:
    """--tune-exit: only exit parameters train; the backbone is frozen."""
    if not args.tune_exit:
        return
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("exits.")


def wrap_model(model, args) -> DistributedDataParallel:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.bf16 or args.fp16,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_grad_reduce=False,
    )
    return DistributedDataParallel(model.config, ddp_config, model)


def build_optimizer(model, args, gloo_process_groups: bool = True):
    config = OptimizerConfig(
        optimizer=args.optimizer,
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        fp16=args.fp16,
        loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, [model], use_gloo_process_groups=gloo_process_groups)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if args.lr_warmup_iters else args.lr,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
        wsd_decay_steps=args.lr_wsd_decay_iters,
    )
    return optimizer, scheduler


def forward_step(data_iterator, model, args, iteration: int, device: torch.device, ee_config):
    # Pinned batches (CUDA) copy while the host goes on; the first kernel that reads them waits.
    batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items() if isinstance(v, torch.Tensor)}
    tokens = batch["tokens"]
    mask = batch.get("attention_mask")
    with torch.no_grad() if args.tune_exit else torch.enable_grad():
        # Exit tuning: the frozen backbone runs without a graph; exit heads (run in
        # loss_func) still build theirs.
        output = model(
            tokens, batch["position_ids"], mask, labels=batch["labels"],
            # Exit tuning needs nothing past the last exit; earlier stages still feed the next.
            run_to_final=not (args.tune_exit and parallel_state.is_pipeline_last_stage()),
        )
    return output, partial(early_exit_loss, loss_mask=batch["loss_mask"], ee_config=ee_config, iteration=iteration)


@dataclass
class StageSchedule:
    """This stage's plans and links, built once per run."""

    train_actions: list
    eval_actions: list
    links: Optional[StageLinks]
    fill_items: List[tuple]  # ("W", j) and ("C", j) items of every step, in data order
    ee_config: object  # the exits the flags describe (their losses in every microbatch)


def build_stage_schedule(args, model, device) -> StageSchedule:
    pp, stage = parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_rank()
    m = microbatches.get_num_microbatches()
    ee_config = build_early_exit_config(args)
    fill = None
    if args.fill_explicit_bubbles:
        default = default_num_fill_microbatches(pp, args.backward_forward_ratio)
        fill = build_fill_plan(
            pp, exit_stages(ee_config, args.num_layers, pp),
            default if args.num_fill_warmup_microbatches is None else args.num_fill_warmup_microbatches,
            default if args.num_fill_cooldown_microbatches is None else args.num_fill_cooldown_microbatches,
            args.backward_forward_ratio,
        )
    plan = pipeline_plan(pp, m, fill)
    check_plan(plan)
    train = exit_tuning_plan(pp, stage, m) if args.tune_exit else plan[stage]
    links = None
    if pp > 1:
        seq = args.seq_length // (args.tensor_model_parallel_size if args.sequence_parallel else 1)
        links = StageLinks(
            parallel_state.get_pipeline_model_parallel_group(), (seq, args.micro_batch_size, args.hidden_size),
            model.config.params_dtype, device,
        )
    fill_items = [("W", j) for j in range(len(fill.warmup_reach))] + [("C", j) for j in range(len(fill.cooldown_stop))] if fill else []
    return StageSchedule(train, [a for a in plan[stage] if a.kind == "F" and a.item[0] == "R"], links, fill_items,
                         ee_config)


def gather_pipeline_metrics(metrics: Dict[str, float]) -> Dict[str, float]:
    """Each stage knows the losses of its own exits (and the last one the final loss)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return metrics
    parts = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    torch.distributed.all_gather_object(parts, metrics, group=parallel_state.get_pipeline_model_parallel_group())
    merged = {}
    for part in parts:
        merged.update(part)
    order = lambda k: (k != "lm loss", not k.startswith("early loss"), _layer_of(k), k)  # noqa: E731
    return {k: merged[k] for k in sorted(merged, key=order)}


def _layer_of(key: str) -> int:
    return int(key.split("[")[1].rstrip("]")) if "[" in key else 0


def _run(schedule: StageSchedule, actions, model, batches, args, iteration, device, forward_only=False, loss_scale=None):
    return run_schedule(
        actions, partial(forward_step, args=args, iteration=iteration, device=device, ee_config=schedule.ee_config),
        batches, model,
        microbatches.get_num_microbatches(), schedule.links, forward_only=forward_only, loss_scale=loss_scale,
    )


def train_step(model, optimizer, scheduler, schedule: StageSchedule, data_iterator, fill_iterator, args, iteration, device):
    model.zero_grad_buffer()
    optimizer.zero_grad()
    batches = {("R", j): next(data_iterator) for j in range(microbatches.get_num_microbatches())}
    batches.update({item: next(fill_iterator) for item in schedule.fill_items})
    reports = _run(schedule, schedule.train_actions, model, batches, args, iteration, device,
                   loss_scale=lambda loss: loss * optimizer.get_loss_scale())
    finalize_model_grads([model])
    allreduce_tied_embedding_grads(model)
    ok, grad_norm, _ = optimizer.step()
    if ok:
        scheduler.step(increment=1)
    return gather_pipeline_metrics(average_reports(reports)), grad_norm, ok


@torch.no_grad()
def evaluate(model, schedule: StageSchedule, data_iterator, args, iteration, device) -> Dict[str, float]:
    model.eval()
    reports = []
    for _ in range(args.eval_iters):
        batches = {("R", j): next(data_iterator) for j in range(microbatches.get_num_microbatches())}
        reports += _run(schedule, schedule.eval_actions, model, batches, args, iteration, device, forward_only=True)
    model.train()
    return gather_pipeline_metrics(average_reports(reports))


def check_finite(iteration: int, metrics: Dict[str, float], grad_norm, args) -> None:
    """Stop the run (every rank sees the same reduced values) at a NaN or Inf loss or
    gradient norm; the weights after that step are never saved."""
    bad = [f"{k} is {v}" for k, v in metrics.items() if "loss" in k and not math.isfinite(v)]
    if grad_norm is not None and not math.isfinite(float(grad_norm)):
        bad.append(f"grad norm is {float(grad_norm)}")
    if not bad:
        return
    kept = ""
    marker = os.path.join(args.save, checkpointing.TRACKER) if args.save else None
    if marker and os.path.isfile(marker):
        kept = f"; the latest checkpoint under --save {args.save} (iteration {checkpointing.latest_iteration(args.save)}) is kept"
    raise NonFiniteError(f"iteration {iteration}: {', '.join(bad)}; the run stops before saving this state{kept}")


def pretrain(args) -> TrainState:
    pp = args.pipeline_model_parallel_size
    ctx = initialize_parallel(
        args.tensor_model_parallel_size, pp, seed=args.seed, device=args.device,
        gloo_process_groups=args.enable_gloo_process_groups,
        tied_embedding_stages=tied_embedding_stages(build_early_exit_config(args), args.num_layers, pp,
                                                    not args.untie_embeddings_and_output_weights),
    )
    with checkpointing.exclusive_save_dir(args.save):  # before anything slow: a bad --save fails at once
        return _train(args, ctx)


def _train(args, ctx) -> TrainState:
    microbatches.destroy_num_microbatches_calculator()
    microbatches.init_num_microbatches_calculator(ctx.rank, None, args.global_batch_size, args.micro_batch_size, ctx.dp_size)
    is_logger = ctx.rank == ctx.world_size - 1  # holds the final loss once pipelines exist
    log = MetricsLogger(args.tensorboard_dir, enabled=is_logger)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file, args.vocab_size)
    vocab_size = padded_vocab_size(tokenizer.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)
    train_ds, valid_ds, _ = build_datasets(args, tokenizer)

    model = build_model(args, ctx.device, vocab_size)
    apply_exit_tuning(model, args)
    model = wrap_model(model, args)
    optimizer, scheduler = build_optimizer(model, args, ctx.gloo_process_groups)
    state = TrainState(model=model)
    if args.load:
        state.iteration, state.consumed_samples = checkpointing.load(args, model, optimizer, scheduler)

    schedule = build_stage_schedule(args, model, ctx.device)
    pin = ctx.device.type == "cuda"
    train_iter = build_data_iterator(train_ds, args, state.consumed_samples, pin_memory=pin)
    # Fill microbatches read samples beyond the real ones, at a fixed place per iteration.
    fill_per_iter = len(schedule.fill_items) * args.micro_batch_size * ctx.dp_size
    fill_iter = build_data_iterator(train_ds, args, args.train_iters * args.global_batch_size + state.iteration * fill_per_iter,
                                    pin_memory=pin)
    valid_iter = build_data_iterator(valid_ds, args, cyclic=True, pin_memory=pin)
    tokens_per_iter = args.global_batch_size * args.seq_length
    last_log = time.time()
    model.train()
    while state.iteration < args.train_iters:
        metrics, grad_norm, ok = train_step(model, optimizer, scheduler, schedule, train_iter, fill_iter, args, state.iteration, ctx.device)
        state.iteration += 1
        state.consumed_samples += args.global_batch_size
        state.history.append({**metrics, "grad norm": float(grad_norm or 0.0)})
        check_finite(state.iteration, metrics, grad_norm if ok else None, args)
        if state.iteration % args.log_interval == 0 or state.iteration == args.train_iters:
            elapsed = (time.time() - last_log) / (args.log_interval if state.iteration % args.log_interval == 0 else 1)
            last_log = time.time()
            extra = {
                "consumed samples": state.consumed_samples,
                "elapsed time per iteration (ms)": elapsed * 1000,
                "learning rate": optimizer.param_groups[0]["lr"],
                "global batch size": args.global_batch_size,
                "grad norm": float(grad_norm or 0.0),
                "tokens/s": tokens_per_iter / max(elapsed, 1e-9),
            }
            log.training(state.iteration, args.train_iters, metrics, extra)
        if valid_iter is not None and args.eval_iters > 0 and (
            state.iteration % args.eval_interval == 0 or state.iteration == args.train_iters
        ):
            state.validation.append({"iteration": state.iteration, **evaluate(model, schedule, valid_iter, args, state.iteration, ctx.device)})
            log.validation(state.iteration, {k: v for k, v in state.validation[-1].items() if k != "iteration"})
        if args.save and (
            (args.save_interval and state.iteration % args.save_interval == 0) or state.iteration == args.train_iters
        ):
            checkpointing.save(args, model, optimizer, scheduler, state.iteration, state.consumed_samples)
    log.close()
    return state
