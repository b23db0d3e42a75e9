"""The run's pipeline plan from its bubble-filling flags.

--fill-explicit-bubbles            fill the 1F1B bubbles with extra microbatches that train exits
--fill-placement idle (default)    only where the plain schedule idles (pipeline/fill.py): the
                                   iteration takes no longer; --num-fill-{warmup,cooldown}-microbatches
                                   cap how many items it adds
--fill-placement fixed             EE-LLM's placement: int((PP-1)*r/(1+r)) items of each kind (or the
                                   counts given) at fixed points, whatever they cost
Both use --backward-forward-ratio r; `idle` also charges each stage its layers, the last
stage the output layer and every stage its exit heads (by FLOPs).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, List, Optional, Tuple

from megatron.early_exit.pipeline.fill import idle_fill_plan, stage_costs
from megatron.early_exit.pipeline.placement import exit_stages
from megatron.early_exit.pipeline.plan import (
    Action,
    FillPlan,
    build_fill_plan,
    default_num_fill_microbatches,
    pipeline_plan,
)

if TYPE_CHECKING:
    from megatron.early_exit.models.model_config import ModelConfig
    from megatron.early_exit.training.run_config import RunConfig, ScheduleConfig

PLACEMENTS = ("idle", "fixed")


def run_pipeline_plan(
    schedule: "ScheduleConfig",
    model: "ModelConfig",
    seq_length: int,
    num_layers: int,
    num_stages: int,
    num_microbatches: int,
    vocab_size: int,
) -> Tuple[List[List[Action]], Optional[FillPlan]]:
    """(every stage's actions, the fill items they hold or None) for this run's pipeline
    flags, its model's exits and shape (`num_layers`: the layers it builds)."""
    p, m, r = num_stages, num_microbatches, schedule.backward_forward_ratio
    if not schedule.fill_explicit_bubbles:
        return pipeline_plan(p, m), None
    ee_config = model.early_exit
    stages = exit_stages(ee_config, num_layers, p)
    warmup, cooldown = schedule.num_fill_warmup_microbatches, schedule.num_fill_cooldown_microbatches
    if schedule.fill_placement == "fixed":
        default = default_num_fill_microbatches(p, r)
        fill = build_fill_plan(
            p, stages, default if warmup is None else warmup, default if cooldown is None else cooldown, r
        )
        return pipeline_plan(p, m, fill), fill
    costs = stage_costs(_flop_shape(model, num_layers), ee_config, p, vocab_size, seq_length, r)
    planned = idle_fill_plan(p, m, stages, costs, warmup, cooldown)
    return planned.plan, planned.fill


def num_fill_items(config: "RunConfig", num_microbatches: int, vocab_size: int) -> int:
    """Fill microbatches per iteration (what the data path reserves samples for)."""
    if not config.schedule.fill_explicit_bubbles:
        return 0
    _, fill = run_pipeline_plan(
        config.schedule, config.model, config.data.seq_length, *config.built_stages, num_microbatches, vocab_size
    )
    return len(fill.warmup_reach) + len(fill.cooldown_stop)


def _flop_shape(model: "ModelConfig", num_layers: int):
    """What flops.py reads of a TransformerConfig, from the model's description."""
    return SimpleNamespace(
        num_layers=num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        ffn_hidden_size=model.ffn_hidden_size,
        gated_linear_unit=bool(model.swiglu),
    )
