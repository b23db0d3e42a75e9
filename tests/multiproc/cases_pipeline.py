"""Pipeline-parallel schedules on 4 processes against a one-process reference.

Each case computes the reference in every process with TP=PP=1 (no communication:
a model without DDP on a 1x1 layout is a single-process run), then the same
weights (layout-invariant initialisation) and data under the pipeline layout,
and compares every loss and every gradient.
"""

import torch
from megatron.core import parallel_state

from megatron.early_exit.config import EarlyExitConfig
from megatron.early_exit.loss import early_exit_loss
from megatron.early_exit.models.early_exit_gpt import EarlyExitGPTModel
from megatron.early_exit.models.init import canonical_name, initialize_layout_invariant
from megatron.early_exit.parallel import allreduce_tied_embedding_grads, initialize_parallel
from megatron.early_exit.pipeline.p2p import StageLinks
from megatron.early_exit.pipeline.placement import exit_stages, layer_stage, tied_embedding_stages
from megatron.early_exit.pipeline.plan import FillPlan, check_plan, pipeline_plan
from megatron.early_exit.pipeline.schedules import run_schedule
from megatron.early_exit.sharding import full_state_dict
from tests.helpers import allreduce_sequence_parallel_grads, make_batch, tiny_transformer_config

SEED, LAYERS, VOCAB, SEQ, MBS = 21, 8, 96, 16, 2


def _build(ee_config, tied_model, sequence_parallel=False):
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    config = tiny_transformer_config(
        num_layers=LAYERS, sequence_parallel=sequence_parallel, pipeline_dtype=torch.float32
    )
    model = EarlyExitGPTModel(
        config,
        ee_config,
        VOCAB,
        SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=tied_model,
    )
    initialize_layout_invariant(model, SEED, 0.02, LAYERS)
    assert pp == 1 or len(model.decoder.layers) == LAYERS // pp
    return model


def _forward_step(ee_config):
    def step(data_iterator, model):
        tokens, labels, pos = next(data_iterator)
        out = model(tokens, pos, None, labels=labels)
        return out, lambda o: early_exit_loss(o, torch.ones_like(labels, dtype=torch.float), ee_config, 0)

    return step


def _canonical_grads(model):
    """Full gradients of this stage, keyed by layout-independent names; copies of the
    word embedding are reported under their own `copy:` names."""
    grads = {}
    for name, grad in full_state_dict(model, grads=True).items():
        key = canonical_name(model, name)
        if name in ("exit_word_embeddings",) or (
            name == "output_layer.weight" and not model.pre_process and model.share_embeddings_and_output_weights
        ):
            key = f"copy:{parallel_state.get_pipeline_model_parallel_rank()}:{name}"
        grads[key] = grad
    return grads


def _gather_pipeline(d):
    parts = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    torch.distributed.all_gather_object(parts, d, group=parallel_state.get_pipeline_model_parallel_group())
    merged = {}
    for part in parts:
        merged.update(part)
    return merged


def _batches(dp_rank, m, fill=FillPlan()):
    batches = {("R", j): make_batch(seed=100 + dp_rank * m + j, batch=MBS, seq=SEQ, vocab=VOCAB) for j in range(m)}
    for j in range(len(fill.warmup_reach)):
        batches[("W", j)] = make_batch(seed=500 + dp_rank * 10 + j, batch=MBS, seq=SEQ, vocab=VOCAB)
    for j in range(len(fill.cooldown_stop)):
        batches[("C", j)] = make_batch(seed=700 + dp_rank * 10 + j, batch=MBS, seq=SEQ, vocab=VOCAB)
    return batches


def _reference(ee_config, tied_model, dp, m, fill=FillPlan(), pp=1):
    """Gradients of the mean loss over dp*m microbatches on one process, plus the fill
    items' contributions as defined in plan.py, built by hand."""
    initialize_parallel(1, 1, seed=SEED)
    model = _build(ee_config, tied_model)
    losses = []
    for r in range(dp):
        batches = _batches(r, m, fill)
        for j in range(m):
            tokens, labels, pos = batches[("R", j)]
            loss, report = early_exit_loss(
                model(tokens, pos, None, labels=labels), torch.ones_like(labels, dtype=torch.float), ee_config, 0
            )
            (loss / (m * dp)).backward()
            losses.append(report)
    grads = {k: v.clone() for k, v in full_state_dict(model, grads=True).items()}
    stages_of_exits = dict(zip(ee_config.exit_layer_nums, exit_stages(ee_config, LAYERS, pp)))
    for r in range(dp):
        batches = _batches(r, m, fill)
        for kind, plan_values in (("W", fill.warmup_reach), ("C", fill.cooldown_stop)):
            for j, bound in enumerate(plan_values):
                model.zero_grad()
                tokens, labels, pos = batches[(kind, j)]
                out = model(tokens, pos, None, labels=labels)
                # W_j: exits on stages <= reach only. C_j: final + exits on stages >= stop,
                # and only parameters of stages >= stop learn.
                keep = (lambda s: s <= bound) if kind == "W" else (lambda s: s >= bound)
                out.exits = [e for e in out.exits if keep(stages_of_exits[e.layer_number])]
                if kind == "W":
                    out.final = None
                loss, _ = early_exit_loss(out, torch.ones_like(labels, dtype=torch.float), ee_config, 0)
                (loss / (m * dp)).backward()
                for name, g in full_state_dict(model, grads=True).items():
                    if kind == "C" and _param_stage(name, pp) < bound:
                        continue
                    grads[name] = grads.get(name, torch.zeros_like(g)) + g
    return grads, losses


def _param_stage(name, pp):
    if name.startswith("decoder.layers."):
        return layer_stage(int(name.split(".")[2]) + 1, LAYERS, pp)
    if name.startswith("exits."):
        return layer_stage(int(name.split(".")[1]), LAYERS, pp)
    if name.startswith("embedding."):
        return 0
    return pp - 1  # final norm, output layer


def _pipeline(ee_config, tied_model, tp, pp, m, fill=FillPlan(), sequence_parallel=False, plan=None):
    initialize_parallel(
        tp, pp, seed=SEED, tied_embedding_stages=tied_embedding_stages(ee_config, LAYERS, pp, tied_model)
    )
    model = _build(ee_config, tied_model, sequence_parallel)
    plan = plan or pipeline_plan(pp, m, fill)
    check_plan(plan)
    seq = SEQ // (tp if sequence_parallel else 1)
    links = StageLinks(
        parallel_state.get_pipeline_model_parallel_group(),
        (seq, MBS, model.config.hidden_size),
        torch.float32,
        torch.device("cpu"),
    )
    reports = run_schedule(
        plan[parallel_state.get_pipeline_model_parallel_rank()],
        _forward_step(ee_config),
        _batches(parallel_state.get_data_parallel_rank(), m, fill),
        model,
        m,
        links,
    )
    allreduce_sequence_parallel_grads(model)
    dp_group = parallel_state.get_data_parallel_group()
    for p in model.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad, group=dp_group)
            p.grad /= parallel_state.get_data_parallel_world_size()
    allreduce_tied_embedding_grads(model)
    return _gather_pipeline(_canonical_grads(model)), reports


def _compare(ee_config, tied_model=True, tp=1, pp=2, m=4, fill=FillPlan(), sequence_parallel=False, plan=None):
    dp = torch.distributed.get_world_size() // (tp * pp)
    ref, ref_reports = _reference(ee_config, tied_model, dp, m, fill, pp)
    got, reports = _pipeline(ee_config, tied_model, tp, pp, m, fill, sequence_parallel, plan)
    copies = {k: v for k, v in got.items() if k.startswith("copy:")}
    got = {k: v for k, v in got.items() if not k.startswith("copy:")}
    assert got.keys() == ref.keys(), sorted(set(got) ^ set(ref))
    diff = max(float((got[k] - ref[k]).abs().max()) for k in ref)
    assert diff < 1e-5, {k: float((got[k] - ref[k]).abs().max()) for k in ref}
    for name, g in copies.items():  # every copy of the embedding got the summed gradient
        assert torch.equal(g, got["embedding.word_embeddings.weight"]), name
    # Losses of this DP rank's microbatches, per exit, as the reference saw them.
    r = parallel_state.get_data_parallel_rank()
    for j, report in enumerate(reports):
        expected = ref_reports[r * m + j]
        for layer, value in report.exit_losses.items():
            assert abs(float(value) - float(expected.exit_losses[layer])) < 1e-5
        if report.lm_loss is not None:
            assert abs(float(report.lm_loss) - float(expected.lm_loss)) < 1e-5
    return {"grad_diff": diff, "tied_copies": len(copies)}


EXITS_EVERYWHERE = dict(exit_layer_nums=[2, 5, 7, 8], exit_layer_weight=[0.2, 0.3, 0.4, 0.1], use_exit_norm=True)


def case_pp4_tied_exits_on_first_middle_last_stages():
    result = _compare(EarlyExitConfig(**EXITS_EVERYWHERE), tied_model=True, pp=4, m=6)
    assert result["tied_copies"] == 2  # stage 2 keeps an exit copy, stage 3 the output layer copy
    return result


def case_pp4_untied_exits_mlp():
    return _compare(
        EarlyExitConfig(**EXITS_EVERYWHERE, untie_exit_output_weights=True, use_exit_mlp=True),
        tied_model=False,
        pp=4,
        m=5,
    )


def case_pp4_tied_exits_untied_model_pre_exit_block():
    return _compare(
        EarlyExitConfig(exit_layer_nums=[3, 5], use_exit_block=True, pre_exit=True), tied_model=False, pp=4, m=4
    )


def case_pp2_dp2():
    return _compare(EarlyExitConfig(**EXITS_EVERYWHERE), tied_model=True, pp=2, m=3)


def case_tp2_pp2_sequence_parallel():
    return _compare(EarlyExitConfig(**EXITS_EVERYWHERE), tied_model=True, tp=2, pp=2, m=4, sequence_parallel=True)


def case_tp2_pp2_layer_dropout():
    """LayerSkip layer dropout skips the same sequences' layers on every stage and TP rank
    as on one process (each microbatch's forward draws by its count)."""
    ee_config = EarlyExitConfig(**EXITS_EVERYWHERE, layer_dropout_max=0.7, use_exit_mlp=True)
    result = _compare(ee_config, tied_model=True, tp=2, pp=2, m=4, sequence_parallel=True)
    probe = _build(ee_config, True)
    partial = sum(0 < len(rows) < MBS for step in range(4) for rows in probe.layer_dropout_keep(step, MBS).values())
    assert partial > 0 and probe.layer_dropout_keep(0, MBS) != probe.layer_dropout_keep(1, MBS)
    return dict(result, partial_skips=partial)


def case_pp4_fewer_microbatches_than_stages():
    return _compare(EarlyExitConfig(**EXITS_EVERYWHERE, untie_exit_output_weights=True), tied_model=False, pp=4, m=2)


def case_pp4_bubble_filling_trains_what_it_reaches():
    # Warm-up fill items reaching stages 0..1 and 0; cool-down ones stopping at stages 1 and 2.
    fill = FillPlan(warmup_reach=(1, 0), cooldown_stop=(1, 2))
    ee_config = EarlyExitConfig(exit_layer_nums=[1, 3, 5, 7], untie_exit_output_weights=True, use_exit_norm=True)
    result = _compare(ee_config, tied_model=False, pp=4, m=4, fill=fill)
    # The fill items do contribute: without them the reference differs exactly where they reach.
    dp = torch.distributed.get_world_size() // 4
    with_fill, _ = _reference(ee_config, False, dp, 4, fill, pp=4)
    without, _ = _reference(ee_config, False, dp, 4, FillPlan(), pp=4)
    changed = {k for k in with_fill if not torch.equal(with_fill[k], without[k])}
    assert "exits.1.output_layer.weight" in changed  # stage 0 exit, reached by W0 and W1
    assert "embedding.word_embeddings.weight" in changed  # W items back-propagate to stage 0
    assert "output_layer.weight" in changed  # C items train the final head
    assert "exits.7.output_layer.weight" in changed  # and the exits of the last stages
    result["params_changed_by_fill"] = len(changed)
    return result


def case_pp4_idle_fill_equals_reference():
    # Items placed in idle slots only (pipeline/fill.py), with a heavy last stage: warm-up
    # items of several reaches and a cool-down item, at their own places in the schedule.
    from megatron.early_exit.pipeline.fill import StageCosts, idle_fill_plan

    costs = StageCosts((1.0, 1.0, 1.0, 2.0), (2.0, 2.0, 2.0, 4.0), (0.5, 0.5, 0.5, 0.5))
    planned = idle_fill_plan(4, 4, [0, 1, 2, 3], costs)
    assert planned.fill.warmup_reach and planned.fill.cooldown_stop, planned.fill
    assert planned.makespan == planned.plain_makespan
    ee_config = EarlyExitConfig(exit_layer_nums=[1, 3, 5, 7], untie_exit_output_weights=True, use_exit_norm=True)
    result = _compare(ee_config, tied_model=False, pp=4, m=4, fill=planned.fill, plan=planned.plan)
    result["fill"] = [list(planned.fill.warmup_reach), list(planned.fill.cooldown_stop)]
    return result
