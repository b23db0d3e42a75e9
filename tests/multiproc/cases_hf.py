"""A converted Hugging Face model loaded at TP=2 x PP=2 (4 processes) computes what it
computes on one process: final logits and every exit's logits.

The checkpoint (converted with --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2,
with exits added) and the one-process reference come from conftest.hf_tp2_pp2_inputs (test_hf.py)
or test_hf_families.py through EE_HF_CHECKPOINT and EE_HF_REFERENCE.
"""

import os

import torch
from megatron.core import parallel_state

from megatron.early_exit.checkpoint.reader import load_weights, resolve
from megatron.early_exit.parallel import initialize_parallel
from megatron.early_exit.pipeline.p2p import StageLinks
from megatron.early_exit.training.arguments import build_run_config, stored_args
from megatron.early_exit.training.trainer import build_model


def _gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel logits [..., v/tp] -> [..., v]."""
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _max_diff_over_pipeline(diffs: dict) -> dict:
    parts = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    torch.distributed.all_gather_object(parts, diffs, group=parallel_state.get_pipeline_model_parallel_group())
    merged = {}
    for part in parts:
        merged.update(part)
    return merged


def case_tp2_pp2_logits_match_one_process():
    path = resolve(os.environ["EE_HF_CHECKPOINT"])
    reference = torch.load(os.environ["EE_HF_REFERENCE"])
    initialize_parallel(2, 2)
    args = stored_args(path, 2)
    assert (args.saved_tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 1)
    args.pipeline_model_parallel_size = 2  # the layout the checkpoint was converted for
    model = build_model(build_run_config(args), torch.device("cpu"), reference["vocab_size"]).eval()
    load_weights(path, model)
    assert len(model.decoder.layers) == args.num_layers // 2

    tokens, position_ids = reference["tokens"], reference["position_ids"]
    links = StageLinks(
        parallel_state.get_pipeline_model_parallel_group(),
        (tokens.shape[1], tokens.shape[0], args.hidden_size),
        torch.float32,
        torch.device("cpu"),
    )
    with torch.no_grad():
        if not parallel_state.is_pipeline_first_stage():
            model.set_input_tensor(links.recv_forward())
        out = model(tokens, position_ids, None)
        if not parallel_state.is_pipeline_last_stage():
            links.send_forward(out.hidden_states)
        links.flush()
        diffs = {}
        for pending in out.exits:
            logits = _gather_vocab(pending.compute_logits()).transpose(0, 1)  # [s, b, v] -> [b, s, v]
            diffs[f"exit {pending.layer_number}"] = float(
                (logits - reference["exits"][pending.layer_number]).abs().max()
            )
        if out.final is not None:
            diffs["final"] = float((_gather_vocab(out.final) - reference["final"]).abs().max())
    diffs = _max_diff_over_pipeline(diffs)
    assert sorted(diffs) == sorted(["final"] + [f"exit {n}" for n in reference["exits"]]), diffs
    assert max(diffs.values()) < 1e-4, diffs
    return diffs
