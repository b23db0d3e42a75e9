"""Checkpoints across layouts (4 processes, TP=2 x PP=2): what one layout saves another
reads, giving the same logits at the final layer and at every exit."""

import os

import torch
from megatron.core import parallel_state, tensor_parallel

from megatron.early_exit.training.arguments import parse_run_config
from megatron.early_exit.training.trainer import pretrain
from tests.training_fixtures import tiny_run_flags

DATA = os.environ.get("EE_TEST_DATA")
ROOT = os.environ.get("EE_TEST_OUT")  # conftest.reshard_inputs wrote the TP=1 checkpoint here
# Untied output layer, tied exits on both stages: stage 2's exits use its own copy of
# the word embedding, saved as a replica of stage 1's.
FLAGS = {
    "--num-layers": 4,
    "--exit-layer-nums": "1 3",
    "--untie-embeddings-and-output-weights": None,
    "--use-exit-mlp": None,
    "--eval-iters": 0,
}
LAYOUT = {"--tensor-model-parallel-size": 2, "--pipeline-model-parallel-size": 2, "--sequence-parallel": None}
TOKENS = torch.arange(2 * 32).reshape(2, 32) * 7 % 60
PROMPTS = [[3, 6, 9, 12], [10, 11, 12], [40, 42, 44, 46, 48]]


def logits_by_layer(model, tokens: torch.Tensor) -> dict:
    """Full-vocabulary logits of every exit and the final layer, [b, s, v], run stage by
    stage (works for one stage too). Every rank returns the entries its stage computes."""
    model.eval()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    sp = model.config.sequence_parallel
    with torch.no_grad():
        if not first:
            s = tokens.shape[1] // (parallel_state.get_tensor_model_parallel_world_size() if sp else 1)
            hidden = torch.empty(s, tokens.shape[0], model.config.hidden_size)
            torch.distributed.recv(hidden, parallel_state.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(tokens if first else None, positions, None)
        gather = tensor_parallel.gather_from_tensor_model_parallel_region
        result = {f"exit {e.layer_number}": gather(e.compute_logits()).transpose(0, 1) for e in out.exits}
        if last:
            result["final"] = gather(out.final)
        else:
            torch.distributed.send(
                out.hidden_states.contiguous(), parallel_state.get_pipeline_model_parallel_next_rank()
            )
    return result


def _gather_to_all(result: dict) -> dict:
    everything = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everything, result)
    return {k: v for part in everything for k, v in part.items()}


def case_tp2_pp2_saves_a_checkpoint_with_its_logits():
    state = pretrain(
        parse_run_config(tiny_run_flags(DATA, iters=3, **FLAGS, **LAYOUT, **{"--save": os.path.join(ROOT, "tp2pp2")}))
    )
    logits = _gather_to_all(logits_by_layer(state.model.module, TOKENS))
    assert sorted(logits) == ["exit 1", "exit 3", "final"]
    if torch.distributed.get_rank() == 0:
        torch.save(logits, os.path.join(ROOT, "tp2pp2_logits.pt"))
    torch.distributed.barrier()
    return {"saved": True}


def case_tp2_pp2_reads_a_tp1_checkpoint():
    """The TP=1 checkpoint and its logits were written by the single-process test."""
    # One step at learning rate 0 leaves the loaded weights as they are.
    state = pretrain(
        parse_run_config(
            tiny_run_flags(
                DATA,
                iters=1,
                **FLAGS,
                **LAYOUT,
                **{
                    "--load": os.path.join(ROOT, "tp1"),
                    "--finetune": None,
                    "--lr": 0,
                    "--min-lr": 0,
                    "--lr-warmup-iters": 0,
                },
            )
        )
    )
    got = _gather_to_all(logits_by_layer(state.model.module, TOKENS))
    want = torch.load(os.path.join(ROOT, "tp1_logits.pt"))
    assert sorted(got) == sorted(want)
    diffs = {k: float((got[k] - want[k]).abs().max()) for k in want}
    assert max(diffs.values()) < 1e-4, diffs
    return {"max abs diff": max(diffs.values())}


def case_tp2_pp2_generates_what_tp1_generates():
    """Pipeline-based early exit from the TP=1 checkpoint, served at TP=2 x PP=2."""
    from megatron.early_exit.inference import EarlyExit, FullDepth, generate
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.parallel import initialize_parallel

    initialize_parallel(2, 2, seed=1)
    model, _, args = load_model(os.path.join(ROOT, "tp1"), tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert model.config.num_layers == 4 and len(model.decoder.layers) == 2, (model.config.num_layers, args.num_layers)
    want = torch.load(os.path.join(ROOT, "tp1_generations.pt"))
    for name, strategy in (("full", FullDepth()), ("early", EarlyExit(0.2, kv="pipeline"))):
        out = generate(model, PROMPTS, strategy, max_new_tokens=12)
        assert (out.tokens, out.exit_layers) == want[name], (name, out.tokens, out.exit_layers, want[name])
    return {"early depths": sorted({d for row in want["early"][1] for d in row})}
