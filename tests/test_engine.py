"""Continuous batching: every sequence decodes exactly as it would alone, whatever joins,
leaves or is aborted around it (staggered arrivals, mixed lengths and strategies, chunked
prompts, slots reused), on a tiny model whose exits fire for some tokens and not others."""

import pytest

from tests.engine_fixtures import (
    PROMPTS,
    alone,
    assert_same,
    check_mixed_run,
    mixed_requests,
    run_engine,
)
from tests.engine_fixtures import (
    cached_model as build_model,
)


def test_every_sequence_decodes_as_alone(dist1):
    model = build_model()
    requests = mixed_requests()
    finished, steps, _, engine = run_engine(model, requests, arrivals=[0, 0, 0, 1, 2, 4, 9, 10], aborts=[(4, 3)])
    # Request 4 is aborted mid-stream, after 3 tokens: what it got is what it would have got.
    check_mixed_run(finished, steps, [alone(model, *req) for req in requests], aborted=4, num_aborted_tokens=3)
    # 8 sequences through 3 slots: each slot reused, all free again.
    assert engine.num_running == 0 and sorted(engine.free_slots) == [0, 1, 2]


@pytest.mark.parametrize("max_wait", [1, 3])
def test_regrouping_decodes_as_alone(dist1, max_wait):
    """DREX: rows going on past an exit in a small group wait there (up to max_wait steps)
    and run the deeper layers with a later step's; each sequence still decodes as alone."""
    from megatron.early_exit.inference import EarlyExit, SamplingParams

    model = build_model()
    sampled = SamplingParams(temperature=1.0, top_k=20, seed=7)
    requests = [
        (prompt, EarlyExit(0.25, kv=kv), sampled if i == 3 else SamplingParams(), 12, (), 0)
        for i, (prompt, kv) in enumerate((p, kv) for p in PROMPTS for kv in ("recompute", "propagate"))
    ]
    arrivals = [0, 0, 0, 0, 1, 3, 5, 6, 8, 9]
    finished, _, _, engine = run_engine(
        model, requests, arrivals, aborts=[(6, 4)], max_batch=4, regroup="drex", max_wait=max_wait
    )
    assert engine.num_parked > 0  # some tokens waited a step at an exit
    assert engine.longest_wait == max_wait  # and some as long as they may, no longer
    for i, req in enumerate(requests):
        ref = alone(model, *req)
        if i == 6:
            n = len(finished[i].result.tokens[0])
            assert finished[i].finish_reason == "abort" and finished[i].result.tokens[0] == ref.tokens[0][:n]
        else:
            assert_same(finished[i], ref, f"request {i}")
    assert engine.num_running == 0 and sorted(engine.free_slots) == [0, 1, 2, 3]


def test_stop_tokens_and_abort_while_waiting(dist1):
    from megatron.early_exit.inference import EarlyExit, SamplingParams

    model = build_model()
    free = alone(model, PROMPTS[1], EarlyExit(0.35), SamplingParams(), 12, (), 0)
    stop = free.tokens[0][3]
    requests = [(PROMPTS[1], EarlyExit(0.35), SamplingParams(), 12, (stop,), 0)] * 2 + [
        (PROMPTS[2], EarlyExit(0.35), SamplingParams(), 6, (), 0)
    ] * 3
    # One slot: request 2 waits and is aborted before it runs; the others take the slot in turn.
    finished, _, _, _ = run_engine(model, requests, arrivals=[0, 0, 0, 0, 0], aborts=[(2, 0)], max_batch=1)
    for i in (0, 1):
        cut = free.tokens[0].index(stop) + 1
        assert finished[i].result.tokens[0] == free.tokens[0][:cut] and finished[i].finish_reason == "stop"
    assert finished[2].finish_reason == "abort" and finished[2].result.tokens[0] == []
    assert finished[3].result.tokens[0] == finished[4].result.tokens[0] and len(finished[3].result.tokens[0]) == 6


def test_refusals_name_the_field(dist1):
    from megatron.early_exit.inference import InferenceConfigError, SelfSpeculative
    from megatron.early_exit.inference.engine import Engine, QueueFull, SequenceRequest

    engine = Engine(build_model(), 2, 16, max_waiting=1)
    with pytest.raises(InferenceConfigError, match="max_new_tokens: context too long: prompt 0 has 10 tokens"):
        engine.add(SequenceRequest(tuple(range(10)), max_new_tokens=7))
    with pytest.raises(InferenceConfigError, match="its own lane"):
        engine.add(SequenceRequest((1, 2), SelfSpeculative(1), max_new_tokens=4))
    engine.add(SequenceRequest((1, 2), max_new_tokens=2))
    with pytest.raises(QueueFull):
        engine.add(SequenceRequest((1, 2), max_new_tokens=2))


def test_host_syncs_per_engine_step(dist1):
    """A step of a batch of mixed strategies, thresholds and measures reads the device once
    per exit it reaches (every row's decision there at once) and once for its tokens."""
    from megatron.early_exit.inference.engine import Engine, SequenceRequest
    from tests.sync_counter import SyncCounter

    engine = Engine(build_model(), 8, 48, prefill_chunk=64)
    for prompt, strategy, sampling, max_new, stops, top_n in mixed_requests():
        engine.add(SequenceRequest(tuple(prompt), strategy, sampling, max_new, stops, top_n))
    engine.step()  # every prompt at full depth
    depths = set()
    for _ in range(4):
        with SyncCounter() as counter:
            events = engine.step()
        assert len(events) == 8
        depths |= {d for e in events for d in e.exit_layers}
        assert counter.total <= 3 and counter.counts["tolist"] == counter.total, counter.counts  # exits 1, 3; tokens
    assert len(depths) > 1  # rows left at different exits
