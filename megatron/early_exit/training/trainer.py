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
the run. The loop may stop early, saving first (run_control.py: --exit-interval,
--exit-duration-in-mins, --exit-signal-handler); --skip-train only evaluates the checkpoint. A
NaN or Inf loss (final or exit) or gradient norm stops the run at once, before anything of that
state is saved.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Optional

import torch
from megatron.core import num_microbatches_calculator as microbatches
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.utils import get_attr_wrapped_model

from megatron.early_exit.checkpoint.lock import exclusive_save_dir
from megatron.early_exit.checkpoint.reader import TRACKER, latest_iteration
from megatron.early_exit.errors import EarlyExitError
from megatron.early_exit.launcher import signal_handling_note, under_torchrun, watch_launcher
from megatron.early_exit.loss import early_exit_loss
from megatron.early_exit.models import builder
from megatron.early_exit.models.early_exit_gpt import EarlyExitGPTModel
from megatron.early_exit.models.model_config import padded_vocab_size
from megatron.early_exit.parallel import allreduce_tied_embedding_grads, initialize_parallel
from megatron.early_exit.pipeline import interleaved
from megatron.early_exit.pipeline.interleaved import ModelChunks, model_chunks
from megatron.early_exit.pipeline.p2p import StageLinks
from megatron.early_exit.pipeline.placement import tied_embedding_stages
from megatron.early_exit.pipeline.plan import check_plan, exit_tuning_plan
from megatron.early_exit.pipeline.schedules import run_schedule
from megatron.early_exit.training import checkpointing
from megatron.early_exit.training import timers as phase_timers
from megatron.early_exit.training.bubble_fill import run_pipeline_plan
from megatron.early_exit.training.data import build_data_iterator, build_datasets
from megatron.early_exit.training.logger import MetricsLogger, average_reports, time_left
from megatron.early_exit.training.run_config import CheckpointConfig, RunConfig, check_flash_attention
from megatron.early_exit.training.run_control import RunControl
from megatron.early_exit.training.trackers import build_trackers


class NonFiniteError(EarlyExitError):
    """A loss or gradient norm that is NaN or Inf: the run stops before saving that state."""


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    history: List[Dict[str, float]] = field(default_factory=list)  # one entry per iteration
    validation: List[Dict[str, float]] = field(default_factory=list)
    model: Optional[torch.nn.Module] = None  # the trained (DDP-wrapped) model, for callers and tests
    skipped_iterations: int = 0  # fp16: steps the loss scaler skipped (gradients overflowed)


def build_model(
    config: RunConfig, device: torch.device, vocab_size: int, vp_stage: Optional[int] = None
) -> EarlyExitGPTModel:
    """The model of the run on this rank (layout from the parallel state); `vp_stage`:
    one of its chunks (interleaved pipeline)."""
    return builder.build_model(
        config.built_model_config(vocab_size),
        device,
        seed=config.training.seed,
        transformer_impl=config.implementation.transformer_impl,
        sequence_parallel=config.parallel.sequence_parallel,
        document_mask=config.data.reset_attention_mask,
        recompute=config.recompute,
        transformer_overrides=config.implementation.transformer_overrides(),
        vp_stage=vp_stage,
        num_model_chunks=config.virtual_pipeline_chunks,
    )


def apply_exit_tuning(model: EarlyExitGPTModel, tune_exit: bool) -> None:
    """--tune-exit: only exit parameters train; the backbone is frozen."""
    if not tune_exit:
        return
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("exits.")


def wrap_model(model, config: RunConfig) -> DistributedDataParallel:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=config.training.bf16 or config.training.fp16,
        use_distributed_optimizer=config.parallel.use_distributed_optimizer,
        overlap_grad_reduce=config.parallel.overlap_grad_reduce,
        overlap_param_gather=config.parallel.overlap_param_gather,
    )
    return DistributedDataParallel(model.config, ddp_config, model)


def loss_scale_metrics(optimizer, ok: bool, fp16: bool) -> Dict[str, float]:
    """fp16: the loss scale after this step, and whether the step was skipped."""
    if not fp16:
        return {}
    return {"loss scale": float(optimizer.get_loss_scale()), "skipped": float(not ok)}


def interval_skips(state: TrainState, last_log_iteration: int, fp16: bool) -> Dict[str, float]:
    """Megatron-LM's log fields: the loss scale and the steps skipped since the last log line."""
    if not fp16:
        return {}
    recent = state.history[-(state.iteration - last_log_iteration) :]
    return {
        "loss scale": recent[-1]["loss scale"],
        "number of skipped iterations": int(sum(h["skipped"] for h in recent)),
    }


def sync_params(model: DistributedDataParallel) -> None:
    """--overlap-param-gather leaves the updated parameters to be gathered by the next
    forward; gather them now, before anything else reads them (a checkpoint, the caller)."""
    if model.ddp_config.overlap_param_gather:
        model.start_param_sync(force_sync=True)


def build_optimizer(model, config: RunConfig, gloo_process_groups: bool = True):
    t = config.training
    optimizer_config = OptimizerConfig(
        optimizer=t.optimizer,
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=t.bf16,
        fp16=t.fp16,
        loss_scale=t.loss_scale,
        initial_loss_scale=t.initial_loss_scale,
        use_distributed_optimizer=config.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(
        optimizer_config, model_chunks(model), use_gloo_process_groups=gloo_process_groups
    )
    steps = t.scheduler_steps  # in iterations, or in samples with --train-samples
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if steps.warmup else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=steps.warmup,
        lr_decay_steps=steps.decay,
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=steps.total,
        wd_incr_style="constant",
        wsd_decay_steps=steps.wsd_decay,
    )
    return optimizer, scheduler


def forward_step(data_iterator, model, config: RunConfig, iteration: int, device: torch.device, ee_config):
    # Pinned batches (CUDA) copy while the host goes on; the first kernel that reads them waits.
    batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items() if isinstance(v, torch.Tensor)}
    tokens = batch["tokens"]
    mask = batch.get("attention_mask")
    tune_exit = config.training.tune_exit
    with torch.no_grad() if tune_exit else torch.enable_grad():
        # Exit tuning: the frozen backbone runs without a graph; exit heads (run in
        # loss_func) still build theirs.
        output = model(
            tokens,
            batch["position_ids"],
            mask,
            labels=batch["labels"],
            # Exit tuning needs nothing past the last exit (unless the exits distil from the
            # final layer); earlier stages still feed the next.
            run_to_final=not (tune_exit and parallel_state.is_pipeline_last_stage())
            or ee_config.exit_distill_weight > 0,
        )
    return output, partial(
        early_exit_loss,
        loss_mask=batch["loss_mask"],
        ee_config=ee_config,
        iteration=iteration,
        zero_weight_gradients=config.parallel.overlap_grad_reduce,
    )


@dataclass
class StageSchedule:
    """This stage's plans and links, built once per run."""

    train_actions: list
    eval_actions: list
    links: Optional[StageLinks]
    fill_items: List[tuple]  # ("W", j) and ("C", j) items of every step, in data order
    ee_config: object  # the exits the flags describe (their losses in every microbatch)


def build_stage_schedule(config: RunConfig, model, device) -> StageSchedule:
    pp, stage = (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_rank(),
    )
    m = microbatches.get_num_microbatches()
    ee_config, chunks, parallel = config.early_exit, config.virtual_pipeline_chunks, config.parallel
    if chunks > 1:
        plan, fill = interleaved.interleaved_plan(pp, m, chunks), None
    else:
        plan, fill = run_pipeline_plan(
            config.schedule,
            config.model,
            config.data.seq_length,
            config.built_stages[0],
            pp,
            m,
            get_attr_wrapped_model(model, "vocab_size"),
        )
    check_plan(plan)
    train = exit_tuning_plan(pp, stage, m) if config.training.tune_exit else plan[stage]
    links = None
    if pp > 1:
        seq = config.data.seq_length // (parallel.tensor_model_parallel_size if parallel.sequence_parallel else 1)
        links = StageLinks(
            parallel_state.get_pipeline_model_parallel_group(),
            (seq, config.training.micro_batch_size, config.model.hidden_size),
            model.config.params_dtype,
            device,
        )
    fill_items = (
        [("W", j) for j in range(len(fill.warmup_reach))] + [("C", j) for j in range(len(fill.cooldown_stop))]
        if fill
        else []
    )
    return StageSchedule(
        train, [a for a in plan[stage] if a.kind == "F" and a.item[0] == "R"], links, fill_items, ee_config
    )


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


def _run(
    schedule: StageSchedule,
    actions,
    model,
    batches,
    config: RunConfig,
    iteration,
    device,
    forward_only=False,
    loss_scale=None,
    timers=None,
):
    step = partial(forward_step, config=config, iteration=iteration, device=device, ee_config=schedule.ee_config)
    return run_schedule(
        actions,
        phase_timers.timed_forward_step(timers, step) if timers is not None else step,
        batches,
        model_chunks(model),
        microbatches.get_num_microbatches(),
        schedule.links,
        forward_only=forward_only,
        loss_scale=loss_scale,
    )


def train_step(
    model,
    optimizer,
    scheduler,
    schedule: StageSchedule,
    data_iterator,
    fill_iterator,
    config: RunConfig,
    iteration,
    device,
    timers=None,
):
    timers = timers or phase_timers.Timers(0, "max")
    model.zero_grad_buffer()
    optimizer.zero_grad()
    batches = {("R", j): next(data_iterator) for j in range(microbatches.get_num_microbatches())}
    batches.update({item: next(fill_iterator) for item in schedule.fill_items})
    before = phase_timers.snapshot(timers)
    with phase_timers.timing(timers, phase_timers.FORWARD_BACKWARD):
        reports = _run(
            schedule,
            schedule.train_actions,
            model,
            batches,
            config,
            iteration,
            device,
            loss_scale=lambda loss: loss * optimizer.get_loss_scale(),
            timers=timers,
        )
    phase_timers.add_backward_time(timers, before)
    with phase_timers.timing(timers, phase_timers.OPTIMIZER):
        finalize_model_grads(model_chunks(model))
        allreduce_tied_embedding_grads(model_chunks(model))
        ok, grad_norm, _ = optimizer.step()
    if ok:
        # --train-samples: the schedule counts samples.
        scheduler.step(increment=microbatches.get_current_global_batch_size() if config.training.train_samples else 1)
    return gather_pipeline_metrics(average_reports(reports)), grad_norm, ok


@torch.no_grad()
def evaluate(model, schedule: StageSchedule, data_iterator, config: RunConfig, iteration, device) -> Dict[str, float]:
    model.eval()
    reports = []
    for _ in range(config.logging.eval_iters):
        batches = {("R", j): next(data_iterator) for j in range(microbatches.get_num_microbatches())}
        reports += _run(schedule, schedule.eval_actions, model, batches, config, iteration, device, forward_only=True)
    model.train()
    return gather_pipeline_metrics(average_reports(reports))


def check_finite(iteration: int, metrics: Dict[str, float], grad_norm, save: Optional[str]) -> None:
    """Stop the run (every rank sees the same reduced values) at a NaN or Inf loss or
    gradient norm; the weights after that step are never saved."""
    bad = [f"{k} is {v}" for k, v in metrics.items() if "loss" in k and not math.isfinite(v)]
    if grad_norm is not None and not math.isfinite(float(grad_norm)):
        bad.append(f"grad norm is {float(grad_norm)}")
    if not bad:
        return
    kept = ""
    marker = os.path.join(save, TRACKER) if save else None
    if marker and os.path.isfile(marker):
        latest = latest_iteration(save)
        kept = f"; the latest checkpoint under --save {save} (iteration {latest}) is kept"
    raise NonFiniteError(f"iteration {iteration}: {', '.join(bad)}; the run stops before saving this state{kept}")


def pretrain(config: RunConfig) -> TrainState:
    """Train the run `config` describes (arguments.parse_run_config builds it from the flags)."""
    if not isinstance(config, RunConfig):
        raise TypeError(
            f"pretrain takes a RunConfig (arguments.parse_run_config(argv), or build_run_config of "
            f"parsed flags), not {type(config).__module__}.{type(config).__name__}"
        )
    start = time.time()  # --exit-duration-in-mins counts from here, as Megatron-LM's
    watch_launcher()  # a worker whose torchrun was killed exits instead of training on
    check_flash_attention(config)
    num_layers, pp = config.built_stages
    ctx = initialize_parallel(
        config.parallel.tensor_model_parallel_size,
        pp,
        seed=config.training.seed,
        device=config.parallel.device,
        gloo_process_groups=config.parallel.gloo_process_groups,
        tied_embedding_stages=_tied_embedding_stages(config, num_layers, pp),
    )
    if config.training.exit_signal_handler and under_torchrun() and ctx.rank == 0:
        print(signal_handling_note(), flush=True)
    with exclusive_save_dir(config.checkpoint.save):  # before anything slow: a bad --save fails at once
        return _train(config, ctx, start)


def _tied_embedding_stages(config: RunConfig, num_layers: int, pp: int):
    tied_output, ee_config, chunks = (
        not config.model.untie_embeddings_and_output_weights,
        config.early_exit,
        config.virtual_pipeline_chunks,
    )
    if chunks > 1:
        return interleaved.tied_embedding_stages(ee_config, num_layers, pp, chunks, tied_output)
    return tied_embedding_stages(ee_config, num_layers, pp, tied_output)


def _build_wrapped_model(config: RunConfig, device, vocab_size):
    """The stage's model, DDP-wrapped; with the interleaved pipeline its chunks, each wrapped."""
    chunks = config.virtual_pipeline_chunks
    if chunks > 1:
        return ModelChunks(
            [wrap_model(build_model(config, device, vocab_size, vp_stage=c), config) for c in range(chunks)]
        )
    model = build_model(config, device, vocab_size)
    apply_exit_tuning(model, config.training.tune_exit)
    return wrap_model(model, config)


def _train(config: RunConfig, ctx, start_time: float) -> TrainState:
    t, log_config, ckpt = config.training, config.logging, config.checkpoint
    microbatches.destroy_num_microbatches_calculator()
    microbatches.init_num_microbatches_calculator(
        ctx.rank,
        list(t.rampup_batch_size) if t.rampup_batch_size else None,
        t.global_batch_size,
        t.micro_batch_size,
        ctx.dp_size,
    )
    is_logger = ctx.rank == ctx.world_size - 1  # holds the final loss once pipelines exist
    trackers = build_trackers(log_config, ckpt.save, config.flags, enabled=is_logger)
    log = MetricsLogger(log_config.tensorboard_dir, enabled=is_logger, writer=trackers)
    tokenizer = config.model.tokenizer.build()
    vocab_size = model_vocab_size(config, tokenizer.vocab_size)
    train_ds, valid_ds, _ = build_datasets(config, tokenizer, vocab_size)

    model = _build_wrapped_model(config, ctx.device, vocab_size)
    optimizer, scheduler = build_optimizer(model, config, ctx.gloo_process_groups)
    state = TrainState(model=model)
    if ckpt.load and not _starts_fresh(ckpt, config.training.skip_train, ctx.rank):
        state.iteration, state.consumed_samples = checkpointing.load(config, model, optimizer, scheduler)
    microbatches.update_num_microbatches(state.consumed_samples, consistency_check=True)

    timers = phase_timers.build_timers(log_config.timing_log_level, log_config.timing_log_option)
    schedules = StageSchedules(config, model, ctx.device, timers)
    pin = ctx.device.type == "cuda"
    # Every evaluation reads the same first batches of the validation split, so that its
    # losses compare across evaluations, resumed runs and --skip-train.
    evaluate_now = partial(_evaluate_from_start, model, schedules, valid_ds, config, ctx.device, pin)
    if t.skip_train:
        return _evaluate_checkpoint(state, evaluate_now, log, valid_ds, config)
    train_iter = build_data_iterator(train_ds, t.micro_batch_size, state.consumed_samples, pin_memory=pin)
    # Fill microbatches read samples beyond the real ones, at a fixed place per iteration.
    fill_per_iter = len(schedules.current().fill_items) * t.micro_batch_size * ctx.dp_size
    fill_iter = build_data_iterator(
        train_ds,
        t.micro_batch_size,
        t.train_iters * t.global_batch_size + state.iteration * fill_per_iter,
        pin_memory=pin,
    )
    control = RunControl(t.exit_interval, t.exit_duration_in_mins, t.exit_signal_handler, ctx.device, start_time)
    last_log, last_log_iteration = time.time(), state.iteration
    model.train()
    try:
        while state.iteration < t.train_iters:
            microbatches.update_num_microbatches(state.consumed_samples, consistency_check=True)
            batch_size = microbatches.get_current_global_batch_size()
            with phase_timers.timing(timers, phase_timers.ITERATION):
                metrics, grad_norm, ok = train_step(
                    model,
                    optimizer,
                    scheduler,
                    schedules.current(),
                    train_iter,
                    fill_iter,
                    config,
                    state.iteration,
                    ctx.device,
                    timers,
                )
            state.iteration += 1
            state.consumed_samples += batch_size
            state.history.append(
                {**metrics, "grad norm": float(grad_norm or 0.0), **loss_scale_metrics(optimizer, ok, t.fp16)}
            )
            state.skipped_iterations += not ok
            check_finite(state.iteration, metrics, grad_norm if ok else None, ckpt.save)
            if state.iteration % log_config.log_interval == 0 or state.iteration == t.train_iters:
                elapsed = (time.time() - last_log) / (state.iteration - last_log_iteration)
                extra = {
                    "consumed samples": state.consumed_samples,
                    "elapsed time per iteration (ms)": elapsed * 1000,
                    "learning rate": optimizer.param_groups[0]["lr"],
                    "global batch size": batch_size,
                    "grad norm": float(grad_norm or 0.0),
                    "tokens/s": batch_size * config.data.seq_length / max(elapsed, 1e-9),
                    "time left": time_left(elapsed, t.train_iters - state.iteration),
                    **interval_skips(state, last_log_iteration, t.fp16),
                }
                log.training(state.iteration, t.train_iters, metrics, extra)
                phase_timers.log_timers(
                    timers,
                    state.iteration,
                    state.iteration - last_log_iteration,
                    ctx.device,
                    is_logger,
                    log_config.log_timers_to_tracker,
                    trackers,
                )
                last_log, last_log_iteration = time.time(), state.iteration
            # Asked before validation: a signalled run saves at once (its launcher's grace period runs).
            stop = control.stop_reason(state.iteration)
            if (
                valid_ds is not None
                and log_config.eval_iters > 0
                and not stop
                and (state.iteration % log_config.eval_interval == 0 or state.iteration == t.train_iters)
            ):
                state.validation.append({"iteration": state.iteration, **evaluate_now(state.iteration)})
                log.validation(state.iteration, {k: v for k, v in state.validation[-1].items() if k != "iteration"})
            if ckpt.save and (
                (ckpt.save_interval and state.iteration % ckpt.save_interval == 0)
                or state.iteration == t.train_iters
                or stop
            ):
                sync_params(model)
                checkpointing.save(config, model, optimizer, scheduler, state.iteration, state.consumed_samples)
            if stop:
                if ctx.rank == 0:
                    saved = (
                        f"; checkpoint saved under --save {ckpt.save}" if ckpt.save else " (no --save: nothing saved)"
                    )
                    print(f" exiting at iteration {state.iteration}: {stop}{saved}", flush=True)
                break
    finally:
        control.close()
    sync_params(model)
    log.close()
    return state


def _starts_fresh(ckpt: CheckpointConfig, skip_train: bool, rank: int) -> bool:
    """`--save DIR --load DIR` (Megatron-LM's way to resume after preemption) before DIR
    holds a checkpoint: the first run starts from its initialisation."""
    same_dir = ckpt.save and os.path.abspath(ckpt.save) == os.path.abspath(ckpt.load)
    if not same_dir or ckpt.finetune or skip_train or ckpt.load_iteration is not None:
        return False
    if os.path.isfile(os.path.join(ckpt.load, TRACKER)):
        return False
    if rank == 0:
        print(f" no checkpoint under --load {ckpt.load} yet: training starts from scratch", flush=True)
    return True


def model_vocab_size(config: RunConfig, tokenizer_vocab_size: int) -> int:
    """Rows of the embedding: --padded-vocab-size, or the tokenizer's vocabulary padded to a
    multiple of --make-vocab-size-divisible-by x TP."""
    padded = config.data.padded_vocab_size
    if padded is None:
        return padded_vocab_size(
            tokenizer_vocab_size, config.model.make_vocab_size_divisible_by, config.parallel.tensor_model_parallel_size
        )
    if padded < tokenizer_vocab_size:
        raise EarlyExitError(
            f"--padded-vocab-size ({padded}) is smaller than the tokenizer's vocabulary ({tokenizer_vocab_size})"
        )
    return padded


class StageSchedules:
    """This stage's schedule for each number of microbatches a run meets (batch-size ramp-up
    changes it), built once each; their links time communication when the timers ask."""

    def __init__(self, config: RunConfig, model, device, timers):
        self.config, self.model, self.device, self.timers = config, model, device, timers
        self._built: Dict[int, StageSchedule] = {}

    def current(self) -> StageSchedule:
        m = microbatches.get_num_microbatches()
        if m not in self._built:
            schedule = build_stage_schedule(self.config, self.model, self.device)
            if schedule.links is not None and phase_timers.is_enabled(self.timers, phase_timers.COMMUNICATION):
                schedule = dataclasses.replace(schedule, links=phase_timers.TimedLinks(schedule.links, self.timers))
            self._built[m] = schedule
        return self._built[m]


def _evaluate_from_start(
    model, schedules: StageSchedules, valid_ds, config: RunConfig, device, pin, iteration
) -> Dict[str, float]:
    valid_iter = build_data_iterator(valid_ds, config.training.micro_batch_size, cyclic=True, pin_memory=pin)
    return evaluate(model, schedules.current(), valid_iter, config, iteration, device)


def _evaluate_checkpoint(
    state: TrainState, evaluate_now, log: MetricsLogger, valid_ds, config: RunConfig
) -> TrainState:
    """--skip-train: the validation losses (final and every exit) of the loaded checkpoint."""
    if valid_ds is None or config.logging.eval_iters < 1:
        raise EarlyExitError(
            f"--skip-train: nothing to evaluate (--eval-iters {config.logging.eval_iters}, --split {config.data.split})"
        )
    state.validation.append({"iteration": state.iteration, **evaluate_now(state.iteration)})
    log.validation(state.iteration, {k: v for k, v in state.validation[-1].items() if k != "iteration"})
    log.close()
    return state
