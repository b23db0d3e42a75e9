"""Pipeline-based early exit over PP=2 equals the same method on one stage, token for
token: exits on both stages, batched rows leaving at different stages, sampling, stop
tokens, restricted exits, a pre-exit read before stage 2's first layer, and TP=1 x PP=2
against TP=1 x PP=1 with the same weights (2 processes)."""

import torch
from megatron.core import parallel_state

from megatron.early_exit.config import EarlyExitConfig
from megatron.early_exit.inference import EarlyExit, FullDepth, SamplingParams, generate
from megatron.early_exit.models.init import canonical_name
from megatron.early_exit.parallel import initialize_parallel
from megatron.early_exit.sharding import full_state_dict
from tests.helpers import load_full_state_dict, tiny_transformer_config

PROMPTS = [[5, 17, 3], [40, 2, 77, 13, 8, 61, 9, 30], [11, 12, 13, 14, 15]]


def _build(max_sequence_length=64, **exit_flags):
    from megatron.early_exit.models.early_exit_gpt import EarlyExitGPTModel

    torch.manual_seed(0)
    config = tiny_transformer_config(
        num_layers=4, num_query_groups=2, init_method_std=0.3, pipeline_dtype=torch.float32
    )
    return EarlyExitGPTModel(
        config,
        EarlyExitConfig(exit_layer_nums=[1, 3], **exit_flags),
        vocab_size=96,
        max_sequence_length=max_sequence_length,
        share_embeddings_and_output_weights=False,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    ).eval()


def _load_stage(model, weights):
    """The one-stage model's weights into this stage (global layer numbers; a later
    stage's copy of the word embedding for tied exits)."""
    state = {}
    for name, _ in model.named_parameters():
        source = "embedding.word_embeddings.weight" if name == "exit_word_embeddings" else canonical_name(model, name)
        state[name] = weights[source]
    load_full_state_dict(model, state)


def _pp2_vs_pp1(strategy, sampling=SamplingParams(), stop_tokens=(), max_new_tokens=16, max_seq=64, **exit_flags):
    initialize_parallel(1, 1, seed=3)
    one = _build(max_seq, **exit_flags)
    weights = full_state_dict(one)
    ref = generate(one, PROMPTS, strategy, max_new_tokens=max_new_tokens, sampling=sampling, stop_tokens=stop_tokens)

    initialize_parallel(1, 2, seed=3)
    stage = _build(max_seq, **exit_flags)
    _load_stage(stage, weights)
    out = generate(stage, PROMPTS, strategy, max_new_tokens=max_new_tokens, sampling=sampling, stop_tokens=stop_tokens)

    assert out.tokens == ref.tokens, (out.tokens, ref.tokens)
    assert out.exit_layers == ref.exit_layers, (out.exit_layers, ref.exit_layers)
    assert out.logprobs == ref.logprobs  # same computation, split over two processes: bit for bit
    depths = [d for row in out.exit_layers for d in row[1:]]
    return {"depths": sorted(set(depths)), "tokens": sum(len(t) for t in out.tokens)}


def case_full_depth():
    metrics = _pp2_vs_pp1(FullDepth(), use_exit_norm=True)
    assert metrics["depths"] == [4]
    return metrics


def case_early_exit_rows_leave_on_both_stages():
    metrics = _pp2_vs_pp1(EarlyExit(0.35, kv="pipeline"), use_exit_norm=True)
    assert metrics["depths"] == [1, 3, 4], metrics  # decided on stage 1 (exit 1), stage 2 (exit 3, final)
    return metrics


def case_sampled_with_stop_tokens():
    sampling = SamplingParams(temperature=0.8, top_p=0.9, seed=11)
    initialize_parallel(1, 1, seed=3)
    free = generate(
        _build(use_exit_norm=True), PROMPTS, EarlyExit(0.3, kv="pipeline"), max_new_tokens=16, sampling=sampling
    )
    stop = free.tokens[1][3]  # row 1 must stop after at most 4 tokens
    metrics = _pp2_vs_pp1(EarlyExit(0.3, kv="pipeline"), sampling=sampling, stop_tokens=(stop,), use_exit_norm=True)
    assert metrics["tokens"] < sum(len(t) for t in free.tokens)
    return metrics


def case_untied_mlp_heads_saturation():
    return _pp2_vs_pp1(
        EarlyExit(0.7, "saturation", kv="pipeline"),
        use_exit_norm=True,
        use_exit_mlp=True,
        untie_exit_output_weights=True,
    )


def case_restricted_exits_and_pre_exit_on_stage_two():
    metrics = _pp2_vs_pp1(EarlyExit(0.3, kv="pipeline", exit_layers=(3,)), pre_exit=True)
    assert 1 not in metrics["depths"]
    return metrics


def case_links_hold_a_bounded_number_of_tensors():
    """A long generation (64 tokens) keeps what the links hold in flight bounded on both
    stages, and stays token for token the one-stage run."""
    from megatron.early_exit.inference import pipeline

    made = []

    class Recorded(pipeline._Links):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    pipeline._Links = Recorded
    try:
        metrics = _pp2_vs_pp1(EarlyExit(0.35, kv="pipeline"), max_new_tokens=64, max_seq=80, use_exit_norm=True)
    finally:
        pipeline._Links = Recorded.__bases__[0]
    links = made[-1]
    assert metrics["tokens"] == 64 * len(PROMPTS)
    assert not links.pending and links.peak <= 8, links.peak  # decisions of two steps at most, one step out
    return {**metrics, "peak_in_flight": links.peak}


def case_per_exit_thresholds():
    """A threshold per exit (exit 1 strict, exit 3 loose) decides the same rows on two stages."""
    metrics = _pp2_vs_pp1(EarlyExit(0.35, kv="pipeline", exit_thresholds={1: 0.6, 3: 0.2}), use_exit_norm=True)
    assert 3 in metrics["depths"], metrics
    return metrics
