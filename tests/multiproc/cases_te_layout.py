"""The TE layout (CPU stand-in) at TP=2, with sequence parallelism, equals the local spec at TP=1.

Under SP each TP rank normalises other tokens, so the norms fused into `linear_qkv` and
`linear_fc1` (and the exit MLP's use of its layer's norm) must have their gradients
summed over TP like the local spec's norms.
"""

from megatron.early_exit.config import EarlyExitConfig
from megatron.early_exit.parallel import initialize_parallel
from megatron.early_exit.sharding import full_state_dict
from tests.helpers import (
    build_ee_gpt,
    ee_loss_and_grads,
    load_full_state_dict,
    local_names,
    make_batch,
    max_abs_diff,
    spread_vectors,
    te_names,
    tiny_transformer_config,
)


def _standin_tp2_vs_local_tp1(sequence_parallel, tied_model=True, **exit_kwargs):
    ee_config = EarlyExitConfig(exit_layer_nums=[1, 3], exit_layer_weight=[0.5, 0.25], **exit_kwargs)
    batch = make_batch(seed=9, batch=2, seq=16)
    norm = dict(normalization="LayerNorm", add_bias_linear=True)

    initialize_parallel(1, 1, seed=3)
    ref = build_ee_gpt(
        tiny_transformer_config(num_query_groups=2, transformer_impl="local", **norm), ee_config, tied=tied_model
    )
    spread_vectors(ref)
    weights = full_state_dict(ref)
    ref_loss, ref_grads, ref_report = ee_loss_and_grads(ref, ee_config, batch)

    initialize_parallel(2, 1, seed=3)
    config = tiny_transformer_config(
        num_query_groups=2, sequence_parallel=sequence_parallel, transformer_impl="te_standin", **norm
    )
    model = build_ee_gpt(config, ee_config, tied=tied_model)
    load_full_state_dict(model, te_names(weights))
    loss, grads, report = ee_loss_and_grads(model, ee_config, batch)

    loss_diff = abs(loss.item() - ref_loss.item())
    exit_diff = max(
        abs(report.exit_losses[k].item() - ref_report.exit_losses[k].item()) for k in ref_report.exit_losses
    )
    grad_diff = max_abs_diff(local_names(grads), ref_grads)
    assert loss_diff < 1e-5 and exit_diff < 1e-5, (loss_diff, exit_diff)
    assert grad_diff < 1e-5, grad_diff
    return {"loss_diff": loss_diff, "exit_loss_diff": exit_diff, "grad_diff": grad_diff}


def case_exit_mlp_sequence_parallel():
    return _standin_tp2_vs_local_tp1(True, untie_exit_output_weights=True, use_exit_mlp=True, use_exit_norm=True)


def case_exit_block_pre_exit_untied_model_sequence_parallel():
    return _standin_tp2_vs_local_tp1(True, tied_model=False, use_exit_block=True, pre_exit=True)


def case_exit_mlp_without_sequence_parallel():
    return _standin_tp2_vs_local_tp1(False, use_exit_mlp=True)
