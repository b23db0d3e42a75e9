"""TP=2 (with and without sequence parallelism) equals TP=1 for early-exit models."""

from megatron.early_exit.config import EarlyExitConfig
from megatron.early_exit.parallel import initialize_parallel
from megatron.early_exit.sharding import full_state_dict
from tests.helpers import (
    build_ee_gpt,
    ee_loss_and_grads,
    load_full_state_dict,
    make_batch,
    max_abs_diff,
    tiny_transformer_config,
)


def _tp2_vs_tp1(sequence_parallel, tied_model=True, **exit_kwargs):
    ee_config = EarlyExitConfig(exit_layer_nums=[1, 3], exit_layer_weight=[0.5, 0.25], **exit_kwargs)
    batch = make_batch(seed=9, batch=2, seq=16)

    initialize_parallel(1, 1, seed=3)
    ref = build_ee_gpt(tiny_transformer_config(num_query_groups=2), ee_config, tied=tied_model)
    weights = full_state_dict(ref)
    ref_loss, ref_grads, ref_report = ee_loss_and_grads(ref, ee_config, batch)

    initialize_parallel(2, 1, seed=3)
    config = tiny_transformer_config(num_query_groups=2, sequence_parallel=sequence_parallel)
    model = build_ee_gpt(config, ee_config, tied=tied_model)
    load_full_state_dict(model, weights)
    loss, grads, report = ee_loss_and_grads(model, ee_config, batch)

    loss_diff = abs(loss.item() - ref_loss.item())
    exit_diff = max(
        abs(report.exit_losses[k].item() - ref_report.exit_losses[k].item()) for k in ref_report.exit_losses
    )
    grad_diff = max_abs_diff(grads, ref_grads)
    assert set(report.distill_losses) == set(ref_report.distill_losses)
    if ref_report.distill_losses:  # self-distillation: the vocab-parallel KL equals the full-vocabulary one
        exit_diff = max(
            [exit_diff]
            + [
                abs(report.distill_losses[k].item() - ref_report.distill_losses[k].item())
                for k in ref_report.distill_losses
            ]
        )
    assert loss_diff < 1e-5 and exit_diff < 1e-5, (loss_diff, exit_diff)
    assert grad_diff < 1e-5, grad_diff
    assert any(k.startswith("exits.") for k in grads) or not exit_kwargs.get("untie_exit_output_weights")
    return {"loss_diff": loss_diff, "exit_loss_diff": exit_diff, "grad_diff": grad_diff}


def case_tied_exits():
    return _tp2_vs_tp1(False)


def case_tied_exits_sequence_parallel():
    return _tp2_vs_tp1(True, use_exit_norm=True)


def case_untied_exits():
    return _tp2_vs_tp1(False, untie_exit_output_weights=True)


def case_untied_exits_sequence_parallel_mlp():
    return _tp2_vs_tp1(True, untie_exit_output_weights=True, use_exit_mlp=True, use_exit_norm=True)


def case_tied_exits_untied_model_block_pre_exit_sp():
    return _tp2_vs_tp1(True, tied_model=False, use_exit_block=True, pre_exit=True)


def case_dynamic_weight_temperature():
    return _tp2_vs_tp1(False, use_dynamic_exit_layer_weight=True, exit_layer_temperature=[2.0, 0.5], use_exit_norm=True)


def case_self_distillation():
    return _tp2_vs_tp1(
        False, untie_exit_output_weights=True, use_exit_norm=True, exit_distill_weight=0.5, exit_distill_temperature=2.0
    )


def case_self_distillation_tied_sequence_parallel():
    return _tp2_vs_tp1(True, exit_distill_weight=1.0)


def case_layer_dropout_sequence_parallel():
    """Skipped layers (LayerSkip layer dropout) are the same on both TP ranks as on one process."""
    from tests.helpers import build_ee_gpt

    probe = build_ee_gpt(tiny_transformer_config(), EarlyExitConfig(layer_dropout_max=0.8))
    keep = probe.layer_dropout_keep(0, 2)
    assert any(len(rows) == 1 for rows in keep.values()), keep  # one sequence runs a layer the other skips
    return _tp2_vs_tp1(
        True, use_exit_mlp=True, use_exit_norm=True, untie_exit_output_weights=True, layer_dropout_max=0.8
    )
