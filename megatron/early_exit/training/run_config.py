"""The run's typed configuration: frozen dataclasses built once from the parsed and
validated flags (training/arguments.py), and what the trainer and every module below it
take instead of the argparse namespace.

    RunConfig
      model        ModelConfig (the whole model the flags describe; exits in model.early_exit)
      training     batch sizes, run length, optimizer, precision, when to stop
      parallel     TP, PP, virtual pipeline, DP (derived), device, DDP overlap
      schedule     bubble filling (EE-LLM's pipeline flags)
      data         datasets and what the loader builds from them
      recompute    RecomputeConfig (activation recomputation)
      implementation  layer modules and attention kernels
      logging      log and evaluation intervals, timers, trackers
      checkpoint   --save / --load and what a load restores
      flags        the flags as a checkpoint stores them (its "args") and trackers show them

Field names are the flags' dest names, so a flag and its field are found by one search.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Optional, Tuple

from megatron.early_exit.config import EarlyExitConfig
from megatron.early_exit.errors import ConfigError
from megatron.early_exit.models.model_config import ModelConfig
from megatron.early_exit.models.recompute import RecomputeConfig
from megatron.early_exit.training.batch_schedule import SchedulerSteps, scheduler_steps
from megatron.early_exit.training.pipeline_layout import built_stages, virtual_pipeline_chunks


def _fields_from(cls, values: Mapping[str, Any], **computed):
    """`cls` from the values named as its fields (missing ones keep their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)} - set(computed)
    return cls(**{k: values[k] for k in names if k in values}, **computed)


def _tuple(value):
    return None if value is None else tuple(value)


@dataclass(frozen=True)
class TrainingConfig:
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None
    """Validation fills it: micro batch x data-parallel size when not given."""
    train_iters: Optional[int] = None
    """Optimizer steps; with --train-samples, the iterations those samples take."""
    train_samples: Optional[int] = None
    rampup_batch_size: Optional[Tuple[int, int, int]] = None
    """(start, increment, samples) of a batch-size ramp-up."""
    optimizer: str = "adam"
    lr: Optional[float] = None
    min_lr: float = 0.0
    lr_decay_style: str = "linear"
    lr_decay_iters: Optional[int] = None
    lr_warmup_iters: int = 0
    lr_wsd_decay_iters: Optional[int] = None
    lr_decay_samples: Optional[int] = None
    lr_warmup_samples: int = 0
    lr_wsd_decay_samples: Optional[int] = None
    lr_warmup_fraction: Optional[float] = None
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    bf16: bool = False
    fp16: bool = False
    loss_scale: Optional[float] = None
    initial_loss_scale: float = 2**32
    seed: int = 1234
    tune_exit: bool = False
    """Exit tuning: only exit parameters train, the backbone runs without a graph."""
    exit_interval: Optional[int] = None
    exit_duration_in_mins: Optional[float] = None
    exit_signal_handler: bool = False
    skip_train: bool = False

    @property
    def scheduler_steps(self) -> SchedulerSteps:
        """The LR/WD schedule's lengths (iterations, or samples with --train-samples)."""
        return scheduler_steps(self)

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> "TrainingConfig":
        return _fields_from(cls, values, rampup_batch_size=_tuple(values.get("rampup_batch_size")))


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    """Stages of the whole model (exit tuning may build only the first of them)."""
    tune_exit_pipeline_parallel_size: Optional[int] = None
    """Exit tuning on the first k stages only: the run builds and runs k stages."""
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    num_virtual_stages_per_pipeline_rank: Optional[int] = None
    data_parallel_size: int = 1
    """world size / (TP x built stages), computed once by validation."""
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    device: str = "auto"
    enable_gloo_process_groups: Optional[bool] = None
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False

    @property
    def gloo_process_groups(self) -> Optional[bool]:
        """megatron-core's gloo groups: asked for, or (unset) with the distributed optimizer,
        whose checkpoint exchange gathers on one rank through gloo; None: the platform's choice."""
        if self.enable_gloo_process_groups is None and self.use_distributed_optimizer:
            return True
        return self.enable_gloo_process_groups


@dataclass(frozen=True)
class ScheduleConfig:
    """EE-LLM's pipeline flags (training/bubble_fill.py)."""

    fill_explicit_bubbles: bool = False
    num_fill_warmup_microbatches: Optional[int] = None
    num_fill_cooldown_microbatches: Optional[int] = None
    fill_placement: str = "idle"
    backward_forward_ratio: float = 2.0


@dataclass(frozen=True)
class DataConfig:
    seq_length: Optional[int] = None
    data_path: Optional[Tuple[str, ...]] = None
    """Prefixes, or weight prefix pairs of a blend; None with --mock-data."""
    split: str = "969,30,1"
    mock_data: bool = False
    data_cache_path: Optional[str] = None
    padded_vocab_size: Optional[int] = None
    """--padded-vocab-size: rows of the embedding (None: the tokenizer's vocabulary, padded)."""
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> "DataConfig":
        return _fields_from(cls, values, data_path=_tuple(values.get("data_path")))


@dataclass(frozen=True)
class ImplementationConfig:
    """How the layers are built (results are the same; speed and memory differ)."""

    transformer_impl: Optional[str] = None
    use_flash_attn: bool = False
    apply_query_key_layer_scaling: bool = False

    def transformer_overrides(self) -> dict:
        """TransformerConfig fields these flags set beside the model's description."""
        from megatron.core.transformer.enums import AttnBackend

        overrides = {}
        if self.apply_query_key_layer_scaling:
            overrides["apply_query_key_layer_scaling"] = True
        if self.use_flash_attn:
            overrides["attention_backend"] = AttnBackend.flash
        return overrides


@dataclass(frozen=True)
class LoggingConfig:
    log_interval: int = 100
    eval_interval: int = 1000
    eval_iters: int = 100
    tensorboard_dir: Optional[str] = None
    timing_log_level: int = 0
    timing_log_option: str = "minmax"
    log_timers_to_tracker: bool = False
    wandb_project: Optional[str] = None
    wandb_group: Optional[str] = None
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: str = ""


@dataclass(frozen=True)
class CheckpointConfig:
    save: Optional[str] = None
    load: Optional[str] = None
    load_iteration: Optional[int] = None
    """None: the latest under --load."""
    save_interval: Optional[int] = None
    keep_last: Optional[int] = None
    finetune: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    use_checkpoint_args: bool = False


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    """The whole model; its padded_vocab_size is 0 until the tokenizer gives it (`model_config`)."""
    training: TrainingConfig
    parallel: ParallelConfig
    schedule: ScheduleConfig
    data: DataConfig
    recompute: RecomputeConfig
    implementation: ImplementationConfig
    logging: LoggingConfig
    checkpoint: CheckpointConfig
    flags: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    """The flag values by name, as a checkpoint stores them (its "args": --use-checkpoint-args
    and tools read them) and trackers record them; the run itself reads the typed fields."""

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> "RunConfig":
        """From flag values by name: a validated parse (arguments.build_run_config) or the
        flags a checkpoint stored (whose missing flags keep their defaults)."""
        values = dict(values)
        return cls(
            model=ModelConfig.from_flags({**values, "first_stages_only": False}, padded_vocab_size=0),
            training=TrainingConfig.from_flags(values),
            parallel=_fields_from(ParallelConfig, values),
            schedule=_fields_from(ScheduleConfig, values),
            data=DataConfig.from_flags(values),
            recompute=RecomputeConfig.from_flags(values),
            implementation=_fields_from(ImplementationConfig, values),
            logging=_fields_from(LoggingConfig, values),
            checkpoint=_fields_from(CheckpointConfig, values),
            flags=MappingProxyType(values),
        )

    # -- derived values ------------------------------------------------------------

    @property
    def early_exit(self) -> EarlyExitConfig:
        return self.model.early_exit

    @property
    def num_microbatches(self) -> int:
        """Microbatches of a full global batch on each data-parallel rank."""
        t = self.training
        return t.global_batch_size // (t.micro_batch_size * self.parallel.data_parallel_size)

    @property
    def built_stages(self) -> Tuple[int, int]:
        """(layers, pipeline stages) this run builds: the whole model, or its first stages
        (exit tuning with --tune-exit-pipeline-parallel-size)."""
        p = self.parallel
        return built_stages(self.model.num_layers, p.pipeline_model_parallel_size, p.tune_exit_pipeline_parallel_size)

    @property
    def virtual_pipeline_chunks(self) -> int:
        """Model chunks per pipeline stage (the interleaved schedule's v; 1 without it)."""
        p = self.parallel
        return virtual_pipeline_chunks(
            self.model.num_layers,
            p.pipeline_model_parallel_size,
            p.num_layers_per_virtual_pipeline_stage,
            p.num_virtual_stages_per_pipeline_rank,
        )

    def model_config(self, padded_vocab_size: int) -> ModelConfig:
        """The whole model, its vocabulary known."""
        return dataclasses.replace(self.model, padded_vocab_size=padded_vocab_size)

    def built_model_config(self, padded_vocab_size: int) -> ModelConfig:
        """What this run builds: the whole model, or its first stages' layers (exit tuning
        with --tune-exit-pipeline-parallel-size)."""
        whole, num_layers = self.model_config(padded_vocab_size), self.built_stages[0]
        if num_layers == whole.num_layers:
            return whole
        return dataclasses.replace(whole, num_layers=num_layers, first_stages_only=True)


def check_flash_attention(config: RunConfig) -> None:
    """--use-flash-attn runs Transformer Engine's flash backend: refuse it, when the run
    starts, where that cannot run (parsing accepts it anywhere, so that a GPU cluster's
    script can be checked on any machine)."""
    import importlib.util

    from megatron.early_exit.models.layer_specs import transformer_engine_available
    from megatron.early_exit.parallel import ParallelConfigError, resolve_device

    if not config.implementation.use_flash_attn:
        return
    # Flag combinations first: Transformer Engine accepts them at build and finds no
    # attention backend only at the first forward.
    if not (config.training.bf16 or config.training.fp16):
        raise ConfigError("--use-flash-attn needs --bf16 or --fp16: flash attention has no fp32 kernel")
    if config.data.reset_attention_mask:
        raise ConfigError(
            "--use-flash-attn cannot run with --reset-attention-mask: flash attention takes a causal "
            "mask only, not the per-document mask"
        )
    try:
        device = resolve_device(config.parallel.device)
    except ParallelConfigError:
        device = None
    missing = [
        what
        for what, ok in (
            ("a CUDA device", device is not None and device.type == "cuda"),
            ("Transformer Engine", device is not None and transformer_engine_available(device)),
            ("flash-attn", any(importlib.util.find_spec(m) for m in ("flash_attn", "flash_attn_interface"))),
        )
        if not ok
    ]
    if missing:
        raise ConfigError(
            f"--use-flash-attn needs {', '.join(missing)}, missing here; add --no-use-flash-attn "
            "after it to run with megatron-core's own attention"
        )
