"""Continuous batching: every sequence decodes exactly as it would alone, whatever joins,
leaves or is aborted around it (staggered arrivals, mixed lengths and strategies, chunked
prompts, slots reused), on a tiny model whose exits fire for some tokens and not others."""

from functools import lru_cache

import pytest
import torch

PROMPTS = [[5, 17, 3], [40, 2, 77, 13, 8, 61, 9, 30, 12, 4, 7], [11, 12, 13, 14, 15], [60], [33, 21, 9, 9, 1, 70, 2]]


@lru_cache(maxsize=None)
def build_model():
    from megatron.early_exit.config import EarlyExitConfig
    from megatron.early_exit.models.early_exit_gpt import EarlyExitGPTModel
    from tests.helpers import tiny_transformer_config

    torch.manual_seed(0)
    config = tiny_transformer_config(num_layers=4, num_query_groups=2, init_method_std=0.3)
    model = EarlyExitGPTModel(config, EarlyExitConfig(exit_layer_nums=[1, 3], use_exit_norm=True), vocab_size=96,
                              max_sequence_length=64, share_embeddings_and_output_weights=False)
    return model.eval()


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


def run_engine(model, requests, arrivals, aborts=(), max_batch=3, prefill_chunk=4):
    """Add request i at step arrivals[i]; abort (i, n): request i once it has n tokens (n 0:
    at the step after it was added). Returns (the sequences by request, per step the exit
    depths of the tokens produced, the engine)."""
    from megatron.early_exit.inference.engine import Engine, SequenceRequest

    engine = Engine(model, max_batch, 48, prefill_chunk=prefill_chunk)
    ids, finished, steps = {}, {}, []
    abort_after = dict(aborts)

    def listen(i, event, seq):
        if event.finished:
            finished[i] = seq
        elif len(seq.result.tokens[0]) == abort_after.get(i):
            engine.abort(event.row)  # it leaves at the next step

    step = 0
    while step == 0 or engine.has_work or len(ids) < len(requests):
        for i, at in enumerate(arrivals):
            if at == step:
                prompt, strategy, sampling, max_new, stops, top_n = requests[i]
                ids[i] = engine.add(SequenceRequest(tuple(prompt), strategy, sampling, max_new, stops, top_n),
                                    lambda event, seq, i=i: listen(i, event, seq))
            elif at == step - 1 and abort_after.get(i) == 0:
                engine.abort(ids[i])
        steps.append([d for e in engine.step() for d in e.exit_layers])
        step += 1
        assert step < 500
    return finished, steps, engine


def assert_same(seq, ref, what):
    res = seq.result
    assert res.tokens[0] == ref.tokens[0], what
    assert res.exit_layers[0] == ref.exit_layers[0], what
    torch.testing.assert_close(torch.tensor(res.logprobs[0]), torch.tensor(ref.logprobs[0]), atol=1e-5, rtol=0)
    if ref.top_tokens is not None:
        assert res.top_tokens[0] == ref.top_tokens[0], what


def test_every_sequence_decodes_as_alone(dist1):
    model = build_model()
    requests = mixed_requests()
    finished, steps, engine = run_engine(model, requests, arrivals=[0, 0, 0, 1, 2, 4, 9, 10], aborts=[(4, 3)])
    assert set(finished) == set(range(len(requests)))
    for i, req in enumerate(requests):
        ref = alone(model, *req)
        if i == 4:  # aborted mid-stream: what it got is what it would have got
            assert finished[i].finish_reason == "abort"
            n = len(finished[i].result.tokens[0])
            assert n == 3 < len(ref.tokens[0]) and finished[i].result.tokens[0] == ref.tokens[0][:n]
            continue
        assert finished[i].finish_reason == "length"
        assert_same(finished[i], ref, f"request {i}")
    # Rows left at different depths within one step, and slots were reused.
    assert any(len(set(depths)) > 1 for depths in steps)
    assert any(1 in d for d in steps) and any(3 in d for d in steps)
    assert engine.num_running == 0 and sorted(engine.free_slots) == [0, 1, 2]


def test_stop_tokens_and_abort_while_waiting(dist1):
    from megatron.early_exit.inference import EarlyExit, SamplingParams

    model = build_model()
    free = alone(model, PROMPTS[1], EarlyExit(0.35), SamplingParams(), 12, (), 0)
    stop = free.tokens[0][3]
    requests = [(PROMPTS[1], EarlyExit(0.35), SamplingParams(), 12, (stop,), 0)] * 2 + [
        (PROMPTS[2], EarlyExit(0.35), SamplingParams(), 6, (), 0)] * 3
    # One slot: request 2 waits and is aborted before it runs; the others take the slot in turn.
    finished, _, _ = run_engine(model, requests, arrivals=[0, 0, 0, 0, 0], aborts=[(2, 0)], max_batch=1)
    for i in (0, 1):
        cut = free.tokens[0].index(stop) + 1
        assert finished[i].result.tokens[0] == free.tokens[0][:cut] and finished[i].finish_reason == "stop"
    assert finished[2].finish_reason == "abort" and finished[2].result.tokens[0] == []
    assert finished[3].result.tokens[0] == finished[4].result.tokens[0] and len(finished[3].result.tokens[0]) == 6


def test_refusals_name_the_field(dist1):
    from megatron.early_exit.inference import InferenceConfigError, SelfSpeculative
    from megatron.early_exit.inference.engine import Engine, QueueFull, SequenceRequest

    engine = Engine(build_model(), 2, 16, max_waiting=1)
    with pytest.raises(InferenceConfigError, match="max_new_tokens: prompt of 10 tokens"):
        engine.add(SequenceRequest(tuple(range(10)), max_new_tokens=7))
    with pytest.raises(InferenceConfigError, match="its own lane"):
        engine.add(SequenceRequest((1, 2), SelfSpeculative(1), max_new_tokens=4))
    engine.add(SequenceRequest((1, 2), max_new_tokens=2))
    with pytest.raises(QueueFull):
        engine.add(SequenceRequest((1, 2), max_new_tokens=2))
