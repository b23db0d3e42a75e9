"""Decoding additions the server stands on: top-N alternatives per generated token, the
per-step token callback, and tokens banned after a given token (prevent_newline_after_colon).

One tiny random checkpoint (tests/server_fixtures.py's), loaded in this process."""

import math

import pytest

from tests.server_fixtures import EOD, EXITS, NUM_LAYERS

PROMPTS = [[5, 17, 3], [40, 2, 77, 13, 8, 61, 9, 30], [11, 12, 13, 14, 15]]


@pytest.fixture(scope="module")
def model(server_engine):
    return server_engine[0]


def strategies():
    from megatron.early_exit.inference import EarlyExit, FullDepth, SelfSpeculative

    return [
        FullDepth(),
        EarlyExit(0.16),
        EarlyExit(0.16, kv="propagate"),
        EarlyExit(0.16, kv="pipeline"),
        SelfSpeculative(1, 3),
    ]


@pytest.mark.parametrize("index", range(5), ids=["full", "early_exit", "propagate", "pipeline", "speculative"])
def test_top_n_and_callback_leave_the_tokens_unchanged_and_are_consistent(model, index):
    from megatron.early_exit.inference import generate

    strategy = strategies()[index]
    plain = generate(model, PROMPTS, strategy, 12, stop_tokens=(EOD,))
    events = []
    rich = generate(model, PROMPTS, strategy, 12, stop_tokens=(EOD,), top_n=5, on_tokens=events.append)
    assert rich.tokens == plain.tokens and rich.exit_layers == plain.exit_layers
    assert plain.top_tokens is None and len(rich.top_tokens) == len(PROMPTS)
    for row in range(len(PROMPTS)):
        assert len(rich.top_tokens[row]) == len(rich.tokens[row]) == len(rich.top_logprobs[row])
        for token, lp, top, top_lp in zip(
            rich.tokens[row], rich.logprobs[row], rich.top_tokens[row], rich.top_logprobs[row]
        ):
            assert len(top) == 5 and len(set(top)) == 5 and top_lp == sorted(top_lp, reverse=True)
            assert top[0] == token  # greedy: the chosen token is the likeliest one under its layer
            assert abs(top_lp[0] - lp) < 1e-5 and sum(math.exp(v) for v in top_lp) <= 1 + 1e-5
        mine = [e for e in events if e.row == row]
        assert [t for e in mine for t in e.tokens] == rich.tokens[row]
        assert [d for e in mine for d in e.exit_layers] == rich.exit_layers[row]
        assert [t for e in mine for t in e.top_tokens] == rich.top_tokens[row]
        assert [e.finished for e in mine] == [False] * (len(mine) - 1) + [True]
    if index in (1, 2):
        depths = {d for row in rich.exit_layers for d in row}
        assert min(depths) < NUM_LAYERS, "the threshold does not mix exits"
    if index == 4:  # one event per verification round, however many drafts it accepted
        assert rich.num_drafted > 0 and len(events) <= sum(len(t) for t in rich.tokens)


def test_top_n_under_one_exit_matches_that_exits_distribution(model):
    """With threshold 0 at exit 1 every decoded token leaves there: its alternatives are the
    exit head's, which scoring the same sequence with that exit gives too."""
    from megatron.early_exit.inference import EarlyExit, generate
    from megatron.early_exit.inference.scoring import score

    result = generate(model, [PROMPTS[0]], EarlyExit(0.0, exit_layers=(EXITS[0],)), 6, top_n=3)
    assert result.exit_layers[0][1:] == [EXITS[0]] * 5
    # Over the tokenizer's vocabulary, as decoding chooses from it (padded ids never).
    scored = score(model, [PROMPTS[0] + result.tokens[0]], exit_layer=EXITS[0], top_n=3)
    at = len(PROMPTS[0]) - 1  # the position that predicts the first generated token
    for i in range(1, 6):
        assert scored.top_tokens[0][at + i] == result.top_tokens[0][i]
        assert max(abs(a - b) for a, b in zip(scored.top_logprobs[0][at + i], result.top_logprobs[0][i])) < 1e-4


def test_banned_token_is_never_chosen_after_its_trigger(model):
    from megatron.early_exit.inference import SamplingParams, generate

    free = generate(model, PROMPTS, max_new_tokens=10)
    # Ban, after each row's newest prompt token and after each generated token, the token
    # greedy decoding chose next: the first token must change.
    pairs = tuple({(p[-1], t[0]) for p, t in zip(PROMPTS, free.tokens)})
    banned = generate(model, PROMPTS, max_new_tokens=10, sampling=SamplingParams(ban_after=pairs))
    for prompt, tokens in zip(PROMPTS, banned.tokens):
        sequence = [prompt[-1]] + tokens
        assert all((a, b) not in pairs for a, b in zip(sequence, sequence[1:]))
    assert [t[0] for t in banned.tokens] != [t[0] for t in free.tokens]
    untouched = generate(model, PROMPTS, max_new_tokens=10, sampling=SamplingParams(ban_after=((EOD, 0),)))
    assert untouched.tokens == free.tokens or any(EOD in t for t in free.tokens)
