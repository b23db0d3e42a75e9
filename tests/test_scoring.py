"""score(): per-position log-probabilities equal the log-softmax of a plain model forward,
under the final layer and under each exit, batched or one by one, at TP=1, TP=2 and PP=2.

The `case_*` functions run under torchrun (tests/multiproc/runner.py), launched by
test_parallel_scoring_equals_single_process.
"""

from functools import lru_cache

import pytest
import torch

NUM_LAYERS, EXITS, VOCAB = 4, [1, 3], 96
SEQUENCES = [[5, 17, 3, 9], [40, 2, 77, 13, 8, 61, 9, 30], [11], [11, 12, 13, 14, 15]]


def _build(**exit_flags):
    """This rank's stage of a tiny model with exits after layers 1 and 3."""
    from megatron.core import parallel_state

    from megatron.early_exit.config import EarlyExitConfig
    from megatron.early_exit.models.early_exit_gpt import EarlyExitGPTModel
    from tests.helpers import tiny_transformer_config

    torch.manual_seed(0)
    config = tiny_transformer_config(
        num_layers=NUM_LAYERS, num_query_groups=2, init_method_std=0.3, pipeline_dtype=torch.float32
    )
    return EarlyExitGPTModel(
        config,
        EarlyExitConfig(exit_layer_nums=EXITS, use_exit_norm=True, **exit_flags),
        vocab_size=VOCAB,
        max_sequence_length=64,
        share_embeddings_and_output_weights=False,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    ).eval()


@lru_cache(maxsize=None)
def build_model(variant: str = "norm"):
    flags = {"norm": {}, "untied_mlp": dict(use_exit_mlp=True, untie_exit_output_weights=True)}[variant]
    return _build(**flags)


def reference_logits(model, seq, layer):
    """Logits [len(seq), V] of one sequence alone, straight from the model's forward."""
    with torch.no_grad():
        out = model(torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0), None)
        if layer == NUM_LAYERS:
            return out.final[0].float()
        pending = next(e for e in out.exits if e.layer_number == layer)
        return pending.compute_logits()[:, 0].float()


def reference_logprobs(model, seq, layer, vocab=VOCAB):
    logp = torch.log_softmax(reference_logits(model, seq, layer)[:, :vocab], dim=-1)
    return logp[:-1].gather(-1, torch.tensor(seq[1:]).unsqueeze(-1)).squeeze(-1), logp[:-1]


@pytest.mark.parametrize("variant", ["norm", "untied_mlp"])
@pytest.mark.parametrize("layer", [NUM_LAYERS, *EXITS])
def test_score_equals_log_softmax_of_forward(dist1, variant, layer):
    from megatron.early_exit.inference import score

    model = build_model(variant)
    result = score(model, SEQUENCES, exit_layer=layer)
    assert result.exit_layer == layer
    for i, seq in enumerate(SEQUENCES):
        ref, logp = reference_logprobs(model, seq, layer)
        assert len(result.logprobs[i]) == len(seq) - 1
        assert torch.allclose(torch.tensor(result.logprobs[i], dtype=torch.float32), ref, atol=1e-5)
        assert result.greedy[i] == (logp.argmax(-1) == torch.tensor(seq[1:])).tolist()
        assert result.top_tokens[i] == [[] for _ in seq[1:]]


def test_exits_score_differently_from_final(dist1):
    from megatron.early_exit.inference import score

    model = build_model()
    final = score(model, SEQUENCES[:2]).logprobs
    for layer in EXITS:
        other = score(model, SEQUENCES[:2], exit_layer=layer).logprobs
        assert max(abs(a - b) for r, o in zip(final, other) for a, b in zip(r, o)) > 1e-2


@pytest.mark.parametrize("layer", [NUM_LAYERS, EXITS[0]])
def test_batched_different_lengths_equals_one_by_one(dist1, layer):
    from megatron.early_exit.inference import score

    model = build_model()
    together = score(model, SEQUENCES, exit_layer=layer, top_n=3)
    pairs = score(model, SEQUENCES, exit_layer=layer, top_n=3, batch_size=2)
    for i, seq in enumerate(SEQUENCES):
        alone = score(model, [seq], exit_layer=layer, top_n=3)
        for batched in (together, pairs):
            assert max([abs(a - b) for a, b in zip(batched.logprobs[i], alone.logprobs[0])], default=0) < 1e-5
            assert batched.greedy[i] == alone.greedy[0]
            assert batched.top_tokens[i] == alone.top_tokens[0]


def test_top_n_alternatives_are_the_true_top_n(dist1):
    from megatron.early_exit.inference import score

    model = build_model()
    result = score(model, SEQUENCES, exit_layer=EXITS[1], top_n=5)
    for i, seq in enumerate(SEQUENCES):
        _, logp = reference_logprobs(model, seq, EXITS[1])
        for t in range(len(seq) - 1):
            expected = torch.topk(logp[t], 5)
            assert result.top_tokens[i][t] == expected.indices.tolist()
            assert torch.allclose(
                torch.tensor(result.top_logprobs[i][t], dtype=torch.float32), expected.values, atol=1e-5
            )
            assert result.top_logprobs[i][t] == sorted(result.top_logprobs[i][t], reverse=True)
            assert result.greedy[i][t] == (result.top_tokens[i][t][0] == seq[t + 1])


def test_padded_vocabulary_ids_are_never_scored_or_offered(dist1):
    """With the tokenizer's vocabulary smaller than the embedding, the softmax runs over the
    real ids only: alternatives stay below it and the probabilities sum to one over it."""
    from megatron.early_exit.inference import InferenceConfigError, score

    model, real = build_model(), 80
    seqs = [[5, 17, 3, 9, 79, 0]]
    result = score(model, seqs, top_n=real, vocab_size=real)
    ref, _ = reference_logprobs(model, seqs[0], NUM_LAYERS, vocab=real)
    assert torch.allclose(torch.tensor(result.logprobs[0], dtype=torch.float32), ref, atol=1e-5)
    for tops, lps in zip(result.top_tokens[0], result.top_logprobs[0]):
        assert sorted(tops) == list(range(real))
        assert abs(torch.tensor(lps, dtype=torch.float64).exp().sum().item() - 1) < 1e-5
    with pytest.raises(InferenceConfigError, match=r"\[85\].*\[0, 80\)"):
        score(model, [[1, 85]], vocab_size=real)


def test_score_layers_equals_score_per_layer(dist1):
    """Several heads from one forward pass: each equals its own score() call."""
    from megatron.early_exit.inference.scoring import score, score_layers

    model = build_model("untied_mlp")
    together = score_layers(model, SEQUENCES, [None, *EXITS], top_n=3, batch_size=3)
    assert sorted(together) == sorted([NUM_LAYERS, *EXITS])
    for layer, result in together.items():
        alone = score(model, SEQUENCES, exit_layer=layer, top_n=3)
        assert result.exit_layer == layer
        assert result.top_tokens == alone.top_tokens
        assert max(abs(a - b) for r, o in zip(result.logprobs, alone.logprobs) for a, b in zip(r, o)) < 1e-6


def test_bad_requests_are_refused(dist1):
    from megatron.early_exit.inference import InferenceConfigError, score

    model = build_model()
    with pytest.raises(InferenceConfigError, match=r"exit_layer 2 .*\[1, 3\]"):
        score(model, SEQUENCES, exit_layer=2)
    with pytest.raises(InferenceConfigError, match="empty sequence at index \\[1\\]"):
        score(model, [[1, 2], []])
    with pytest.raises(InferenceConfigError, match="maximum sequence length 64"):
        score(model, [list(range(65))])
    with pytest.raises(InferenceConfigError, match="top_n"):
        score(model, SEQUENCES, top_n=-1)


# -- parallel: equal to one process --------------------------------------------------------


def _parallel_vs_single(tp: int, pp: int):
    from megatron.early_exit.inference import score
    from megatron.early_exit.inference.scoring import score_layers
    from megatron.early_exit.models.init import canonical_name
    from megatron.early_exit.parallel import initialize_parallel
    from megatron.early_exit.sharding import full_state_dict
    from tests.helpers import load_full_state_dict

    initialize_parallel(1, 1, seed=3)
    ref_model = _build()
    weights = full_state_dict(ref_model)
    refs = {layer: score(ref_model, SEQUENCES, exit_layer=layer, top_n=4) for layer in (NUM_LAYERS, *EXITS)}

    initialize_parallel(tp, pp, seed=3)
    model = _build()
    # Global names (layer numbers); a later stage's copy of the tied word embedding.
    load_full_state_dict(
        model,
        {
            name: weights[
                "embedding.word_embeddings.weight" if name == "exit_word_embeddings" else canonical_name(model, name)
            ]
            for name, _ in model.named_parameters()
        },
    )
    diff = 0.0
    for layer, ref in refs.items():
        out = score(model, SEQUENCES, exit_layer=layer, top_n=4, batch_size=3)
        diff = max(diff, *(abs(a - b) for r, o in zip(ref.logprobs, out.logprobs) for a, b in zip(r, o)))
        assert out.top_tokens == ref.top_tokens, layer
        assert out.greedy == ref.greedy, layer
    multi = score_layers(model, SEQUENCES, list(refs), top_n=4, batch_size=3)
    for layer, ref in refs.items():
        diff = max(diff, *(abs(a - b) for r, o in zip(ref.logprobs, multi[layer].logprobs) for a, b in zip(r, o)))
        assert multi[layer].top_tokens == ref.top_tokens, layer
    assert diff < 1e-5, diff
    return {"logprob_diff": diff}


def case_tp2():
    return _parallel_vs_single(2, 1)


def case_pp2():
    return _parallel_vs_single(1, 2)


@pytest.fixture(scope="module")
def scoring_runs(request):
    from tests.conftest import launch_grouped

    return launch_grouped("tests.test_scoring", request)


@pytest.mark.multiproc
@pytest.mark.parametrize("case", ["case_tp2", "case_pp2"])
def test_parallel_scoring_equals_single_process(case, scoring_runs):
    result = scoring_runs[case]
    assert result["ok"], result["error"]
