"""Sampled self-speculative decoding keeps the full model's distribution (chi-square against
the exact distribution of the second and third tokens, over fixed seeds: it cannot flake);
the dynamic exit and draft length (DEL) keep greedy output; pipeline stages refuse it."""

import pytest
import torch

from megatron.early_exit.config import EarlyExitConfig
from megatron.early_exit.inference import FullDepth, SelfSpeculative, generate
from megatron.early_exit.inference.context import inference_context
from megatron.early_exit.inference.sampling import SamplingParams
from megatron.early_exit.inference.speculative import accept_sampled, sampling_probs
from tests.helpers import build_ee_gpt, tiny_transformer_config

PROMPT = [5, 17, 33, 2]
SAMPLING = dict(temperature=1.0, top_k=12)


@pytest.fixture(scope="module")
def peaked_model(dist1):
    """A tiny model whose exit (layer 1) and final distributions are peaked and differ
    (embedding and MLP outputs scaled up), so that a wrong acceptance rule shows."""
    torch.manual_seed(0)
    model = build_ee_gpt(tiny_transformer_config(), EarlyExitConfig(exit_layer_nums=[1, 2])).eval()
    with torch.no_grad():
        model.embedding.word_embeddings.weight.mul_(5)
        for layer in model.decoder.layers:
            layer.mlp.linear_fc2.weight.mul_(20)
    return model


def _next(model, sequences, exit_layer=None):
    """[n, V] sampling distributions after each sequence (all of one length), at the final layer or an exit."""
    tokens = torch.tensor(sequences)
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    with inference_context(model):
        out = model(tokens, pos, None)
        if exit_layer is None:
            logits = out.final[:, -1]
        else:
            logits = next(e for e in out.exits if e.layer_number == exit_layer).compute_logits()[-1]
    return sampling_probs(logits, SamplingParams(**SAMPLING))


def _exact_marginals(model, exit_layer=None):
    """P(t2), P(t3) of full-depth sampling (t2 from `exit_layer` instead when given)."""
    p1 = _next(model, [PROMPT])[0]
    firsts = p1.nonzero().view(-1).tolist()
    p2 = _next(model, [PROMPT + [a] for a in firsts], exit_layer)  # [n1, V]
    m2 = (p1[firsts].unsqueeze(-1) * p2).sum(0)
    pairs = [(a, b) for i, a in enumerate(firsts) for b in p2[i].nonzero().view(-1).tolist()]
    p3 = _next(model, [PROMPT + [a, b] for a, b in pairs])
    weights = torch.tensor([float(p1[a] * p2[firsts.index(a), b]) for a, b in pairs])
    return m2, (weights.unsqueeze(-1) * p3).sum(0)


def _chi_square_pvalue(samples, expected_probs):
    from scipy.stats import chisquare

    n = len(samples)
    counts = torch.bincount(torch.tensor(samples), minlength=expected_probs.numel()).double()
    expected = expected_probs.double() * n
    big = expected >= 5  # pool the rare tokens into one bin
    observed = torch.cat([counts[big], counts[~big].sum().view(1)])
    wanted = torch.cat([expected[big], expected[~big].sum().view(1)])
    observed, wanted = (observed, wanted) if wanted[-1] > 0 else (observed[:-1], wanted[:-1])
    return float(chisquare(observed.numpy(), wanted.numpy() * observed.sum().item() / wanted.sum().item()).pvalue)


@pytest.mark.slow
@pytest.mark.parametrize("num_draft", [1, 3])
def test_sampled_speculation_keeps_the_full_model_distribution(peaked_model, num_draft):
    m2, m3 = _exact_marginals(peaked_model)
    q2, _ = _exact_marginals(peaked_model, exit_layer=1)
    n = 400
    # Power: sampling t2 from the exit alone (every draft accepted) would be rejected outright.
    assert n * float(((q2 - m2) ** 2 / m2.clamp_min(1e-9))[m2 > 0].sum()) > 100
    # Rows of a batch draw independently (row r from a generator seeded seed + r): n samples
    # from n distinct seeds.
    runs = [
        generate(
            peaked_model, [PROMPT] * (n // 2), SelfSpeculative(1, num_draft), 3, SamplingParams(**SAMPLING, seed=seed)
        )
        for seed in (0, n // 2)
    ]
    tokens = [t for r in runs for t in r.tokens]
    drafted, accepted = sum(r.num_drafted for r in runs), sum(r.num_accepted for r in runs)
    assert drafted >= n and 0 < accepted < drafted  # drafts both kept and rejected
    assert _chi_square_pvalue([t[1] for t in tokens], m2) > 1e-3
    assert _chi_square_pvalue([t[2] for t in tokens], m3) > 1e-3


def test_rejection_sampling_step_by_its_definition():
    """q == p accepts every draft; a draft p cannot produce is always rejected and replaced
    from norm(max(0, p - q)); after k acceptances the token comes from p_k."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    assert accept_sampled([1], [p[0]], p, g) == (1, 2)
    q = torch.tensor([0.0, 0.0, 1.0])
    for _ in range(20):
        a, token = accept_sampled([2], [q], p, g)
        assert a == 0 and token in (0, 1)
    assert accept_sampled([], [], p[:1], g)[0] == 0


def test_dynamic_exit_and_draft_length_keep_greedy_output(peaked_model):
    want = generate(peaked_model, [PROMPT, PROMPT[:2]], FullDepth(), 10).tokens
    result = generate(peaked_model, [PROMPT, PROMPT[:2]], SelfSpeculative(1, 4, dynamic=True), 10)
    assert result.tokens == want and result.num_drafted > 0
    assert "dynamic" in result.strategy
