"""Shared by the engine's tests (one process and TP=2): a tiny model whose exits fire for
some tokens and not others, a mix of requests of every kind, and a driver that adds,
aborts and steps, with rank 0 planning each step and every rank executing it."""

from functools import lru_cache

import torch

PROMPTS = [[5, 17, 3], [40, 2, 77, 13, 8, 61, 9, 30, 12, 4, 7], [11, 12, 13, 14, 15], [60], [33, 21, 9, 9, 1, 70, 2]]


def build_model():
    from megatron.early_exit.config import EarlyExitConfig
    from megatron.early_exit.models.early_exit_gpt import EarlyExitGPTModel
    from tests.helpers import tiny_transformer_config

    torch.manual_seed(0)
    config = tiny_transformer_config(num_layers=4, num_query_groups=2, init_method_std=0.3)
    model = EarlyExitGPTModel(
        config,
        EarlyExitConfig(exit_layer_nums=[1, 3], use_exit_norm=True),
        vocab_size=96,
        max_sequence_length=64,
        share_embeddings_and_output_weights=False,
    )
    return model.eval()


cached_model = lru_cache(maxsize=None)(build_model)


def mixed_requests():
    """(prompt, strategy, sampling, max_new_tokens, stop_tokens, top_n): every kind of row."""
    from megatron.early_exit.inference import EarlyExit, FullDepth, SamplingParams

    greedy, sampled = SamplingParams(), SamplingParams(temperature=1.0, top_k=20, seed=11)
    return [
        (PROMPTS[0], FullDepth(), greedy, 12, (), 0),
        (PROMPTS[1], EarlyExit(0.35), greedy, 16, (), 2),
        (PROMPTS[2], EarlyExit(0.5, kv="propagate"), greedy, 9, (), 0),
        (PROMPTS[3], EarlyExit(0.3, exit_layers=(3,)), greedy, 14, (), 0),
        (PROMPTS[4], FullDepth(), sampled, 10, (), 3),
        (PROMPTS[0], EarlyExit(0.4, kv="propagate"), SamplingParams(temperature=0.8, seed=5), 13, (), 0),
        (PROMPTS[2], EarlyExit(0.35, exit_thresholds={1: 0.6}), greedy, 11, (), 0),
        (PROMPTS[1], EarlyExit(0.35, measure="margin"), greedy, 8, (), 0),
    ]


def alone(model, prompt, strategy, sampling, max_new, stops, top_n):
    from megatron.early_exit.inference import generate

    return generate(model, [prompt], strategy, max_new, sampling, stops, top_n=top_n)


def run_engine(model, requests, arrivals, aborts=(), max_batch=3, prefill_chunk=4, regroup="none", max_wait=1):
    """Add request i at step arrivals[i]; abort (i, n): request i once it has n tokens (n 0:
    at the step after it was added). Rank 0 adds, aborts and plans; every rank executes.
    Returns (on rank 0 the finished sequences by request, per step the exit depths of the
    tokens produced, every token event in order as (id, tokens, exits), the engine)."""
    from megatron.early_exit.inference.engine import Engine, SequenceRequest

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank0 = world == 1 or torch.distributed.get_rank() == 0
    engine = Engine(model, max_batch, 48, prefill_chunk=prefill_chunk, regroup=regroup, max_wait=max_wait)
    ids, finished, steps, log = {}, {}, [], []
    abort_after = dict(aborts)

    def listen(i, event, seq):
        if event.finished:
            finished[i] = seq
        elif len(seq.result.tokens[0]) == abort_after.get(i):
            engine.abort(event.row)  # it leaves at the next step

    step = 0
    while True:
        plan = None
        if rank0:
            for i, at in enumerate(arrivals):
                if at == step:
                    prompt, strategy, sampling, max_new, stops, top_n = requests[i]
                    ids[i] = engine.add(
                        SequenceRequest(tuple(prompt), strategy, sampling, max_new, stops, top_n),
                        lambda event, seq, i=i: listen(i, event, seq),
                    )
                elif at == step - 1 and abort_after.get(i) == 0:
                    engine.abort(ids[i])
            if engine.has_work or len(ids) < len(requests):
                plan = engine.plan()
        if world > 1:  # the step plan: one broadcast per step
            box = [plan]
            torch.distributed.broadcast_object_list(box, src=0)
            plan = box[0]
        if plan is None:
            break
        events = engine.execute(plan)
        steps.append([d for e in events for d in e.exit_layers])
        log += [(e.row, e.tokens, e.exit_layers) for e in events]
        step += 1
        assert step < 500
    return finished, steps, log, engine


def assert_same(seq, ref, what):
    res = seq.result
    assert res.tokens[0] == ref.tokens[0], (what, res.tokens[0], ref.tokens[0])
    assert res.exit_layers[0] == ref.exit_layers[0], (what, res.exit_layers[0], ref.exit_layers[0])
    torch.testing.assert_close(torch.tensor(res.logprobs[0]), torch.tensor(ref.logprobs[0]), atol=1e-4, rtol=0)
    if ref.top_tokens is not None:
        assert res.top_tokens[0] == ref.top_tokens[0], what


def check_mixed_run(finished, steps, refs, aborted: int, num_aborted_tokens: int):
    """Every request decoded as alone (`refs`), the aborted one a prefix of its own; rows
    left at different exits within one step."""
    assert set(finished) == set(range(len(refs)))
    for i, ref in enumerate(refs):
        if i == aborted:
            assert finished[i].finish_reason == "abort"
            n = len(finished[i].result.tokens[0])
            assert n == num_aborted_tokens < len(ref.tokens[0]) and finished[i].result.tokens[0] == ref.tokens[0][:n]
            continue
        assert finished[i].finish_reason == "length"
        assert_same(finished[i], ref, f"request {i}")
    assert any(len(set(depths)) > 1 for depths in steps)
    assert any(1 in d for d in steps) and any(3 in d for d in steps)
