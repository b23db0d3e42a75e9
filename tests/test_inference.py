"""The inference decoder equals slow, cache-free references, token for token.

The models (tests/inference_models.py) are tiny, with exit confidences spread over the
thresholds used below; every early-exit test also checks that its threshold produced a mix
of early and deeper tokens, so that it tests something.
"""

import pytest
import torch

from tests.inference_models import NUM_LAYERS, PROMPT, PROMPTS, build_model
from tests.inference_models import generate_tokens as _generate
from tests.inference_reference import no_cache_greedy, reference_generate

# -- full depth ------------------------------------------------------------------------


@pytest.mark.parametrize("position_embedding_type", ["rope", "learned_absolute"])
def test_prefill_logits_equal_model_forward(dist1, position_embedding_type):
    from megatron.early_exit.inference import Decoder

    model = build_model(position_embedding_type=position_embedding_type)
    with torch.no_grad():
        out = Decoder(model, len(PROMPTS), 64).step(list(range(len(PROMPTS))), PROMPTS, all_logits=True)
        for prompt, logits in zip(PROMPTS, out.chunk_logits):
            ref = model(torch.tensor([prompt]), torch.arange(len(prompt)).unsqueeze(0), None).final[0]
            assert logits.shape == ref.shape
            assert (logits - ref).abs().max() < 1e-5


@pytest.mark.parametrize(
    "position_embedding_type,num_query_groups", [("rope", 2), ("rope", 4), ("learned_absolute", 2)]
)
def test_kv_cached_full_depth_equals_no_cache(dist1, position_embedding_type, num_query_groups):
    model = build_model(position_embedding_type=position_embedding_type, num_query_groups=num_query_groups)
    result = _generate(model, [PROMPT], max_new_tokens=24)
    ref_tokens, ref_logprobs = no_cache_greedy(model, PROMPT, 24)
    assert result.tokens[0] == ref_tokens
    assert len(set(ref_tokens)) > 4, "degenerate model: greedy output repeats one token"
    assert max(abs(a - b) for a, b in zip(result.logprobs[0], ref_logprobs)) < 1e-4
    assert result.exit_layers[0] == [NUM_LAYERS] * 24


@pytest.mark.parametrize("kv", ["recompute", "propagate"])
@pytest.mark.parametrize("measure", ["max_prob", "margin", "entropy", "saturation"])
def test_threshold_above_one_is_full_depth(dist1, kv, measure):
    from megatron.early_exit.inference import EarlyExit

    model = build_model()
    result = _generate(model, [PROMPT], EarlyExit(1.01, measure, kv), max_new_tokens=16)
    assert result.tokens[0] == _generate(model, [PROMPT], max_new_tokens=16).tokens[0]
    assert result.exit_layers[0] == [NUM_LAYERS] * 16


# -- early exit against the slow references ----------------------------------------------

CASES = [  # variant, measure, threshold: each gives a mix of exits on PROMPT
    ("tied_norm", "max_prob", 0.35),
    ("tied_norm", "margin", 0.1),
    ("tied_norm", "entropy", 0.4),
    ("tied_norm", "saturation", 0.8),
    ("untied_mlp", "max_prob", 0.15),
    ("untied_mlp", "saturation", 0.7),
    ("pre_exit", "margin", 0.2),
    ("pre_exit_first", "max_prob", 0.6),
]


@pytest.mark.parametrize("kv", ["recompute", "propagate", "pipeline"])
@pytest.mark.parametrize("variant,measure,threshold", CASES)
def test_early_exit_equals_reference(dist1, variant, measure, threshold, kv):
    from megatron.early_exit.inference import EarlyExit

    model = build_model(variant)
    result = _generate(model, [PROMPT], EarlyExit(threshold, measure, kv))
    ref_tokens, ref_depths, ref_logprobs = reference_generate(
        model, PROMPT, 24, threshold, measure, propagate=kv == "propagate"
    )
    assert result.exit_layers[0] == ref_depths
    assert result.tokens[0] == ref_tokens
    assert max(abs(a - b) for a, b in zip(result.logprobs[0], ref_logprobs)) < 1e-4
    decoded = ref_depths[1:]
    assert len(set(decoded)) >= 2 and min(decoded) < NUM_LAYERS, f"threshold gives no mix of exits: {decoded}"


@pytest.mark.parametrize("kv", ["recompute", "propagate", "pipeline"])
def test_exit_layers_restrict_active_exits(dist1, kv):
    from megatron.early_exit.inference import EarlyExit

    model = build_model()
    result = _generate(model, [PROMPT], EarlyExit(0.35, "max_prob", kv, exit_layers=(3,)))
    ref = reference_generate(model, PROMPT, 24, 0.35, "max_prob", exit_layers=[3], propagate=kv == "propagate")
    assert (result.tokens[0], result.exit_layers[0]) == ref[:2]
    assert max(abs(a - b) for a, b in zip(result.logprobs[0], ref[2])) < 1e-4
    assert set(ref[1][1:]) == {3, NUM_LAYERS}


# -- batches with per-sequence exits -----------------------------------------------------


@pytest.mark.parametrize("strategy", ["full", "recompute", "propagate", "pipeline"])
def test_batched_equals_alone(dist1, strategy, monkeypatch):
    from megatron.early_exit.inference import EarlyExit, FullDepth
    from megatron.early_exit.inference import decoder as decoder_module

    packed = []  # work sets whose rows differ in width run packed (layers.Packing)
    build = decoder_module.build_work_set
    monkeypatch.setattr(decoder_module, "build_work_set", lambda *a: packed.append(build(*a)) or packed[-1])
    model = build_model()
    chosen = FullDepth() if strategy == "full" else EarlyExit(0.35, "max_prob", strategy)
    batched = _generate(model, PROMPTS, chosen, max_new_tokens=20)
    assert any(ws.packing is not None for ws in packed), "no padded work set: the packed path went untested"
    for i, prompt in enumerate(PROMPTS):
        alone = _generate(model, [prompt], chosen, max_new_tokens=20)
        assert batched.tokens[i] == alone.tokens[0], f"row {i}"
        assert batched.exit_layers[i] == alone.exit_layers[0], f"row {i}"
    if strategy != "full":  # rows must have left at different layers in the same step
        columns = list(zip(*batched.exit_layers))
        assert any(len(set(c)) > 1 for c in columns)


def test_batched_rows_stop_independently(dist1):
    from megatron.early_exit.inference import EarlyExit

    model = build_model()
    free = _generate(model, PROMPTS, EarlyExit(0.35), max_new_tokens=12)
    stop = free.tokens[1][3]
    stopped = _generate(model, PROMPTS, EarlyExit(0.35), max_new_tokens=12, stop_tokens=[stop])
    for free_row, row in zip(free.tokens, stopped.tokens):
        cut = free_row.index(stop) + 1 if stop in free_row else len(free_row)
        assert row == free_row[:cut]
    assert len(stopped.tokens[1]) <= 4


# -- self-speculative decoding -------------------------------------------------------------


@pytest.mark.parametrize("exit_layer", [1, 3])
@pytest.mark.parametrize("num_draft", [1, 3, 5])
def test_self_speculative_equals_greedy(dist1, exit_layer, num_draft):
    from megatron.early_exit.inference import SelfSpeculative

    model = build_model()
    prompts = PROMPTS[:2]
    greedy = _generate(model, prompts, max_new_tokens=20)
    spec = _generate(model, prompts, SelfSpeculative(exit_layer, num_draft), max_new_tokens=20)
    assert spec.tokens == greedy.tokens
    assert max(abs(a - b) for r, g in zip(spec.logprobs, greedy.logprobs) for a, b in zip(r, g)) < 1e-4
    # Both paths ran: some drafts were accepted, some rejected and cropped away.
    assert 0 < spec.num_accepted < spec.num_drafted


def test_self_speculative_adaptive_draft_length(dist1):
    """A draft threshold stops a row's drafting after an unconfident draft: output still
    the full model's greedy one; threshold 1 drafts one token a round (as num_draft=1),
    a middle one fewer than always drafting num_draft."""
    from megatron.early_exit.inference import SelfSpeculative

    model = build_model()
    prompts = PROMPTS[:2]
    greedy = _generate(model, prompts, max_new_tokens=20)
    runs = {t: _generate(model, prompts, SelfSpeculative(1, 5, t), max_new_tokens=20) for t in (0.0, 0.35, 1.0)}
    one = _generate(model, prompts, SelfSpeculative(1, 1), max_new_tokens=20)
    for run in runs.values():
        assert run.tokens == greedy.tokens
    assert (runs[1.0].num_drafted, runs[1.0].num_accepted, runs[1.0].num_steps) == (
        one.num_drafted,
        one.num_accepted,
        one.num_steps,
    )
    assert runs[1.0].num_drafted < runs[0.35].num_drafted < runs[0.0].num_drafted
    assert SelfSpeculative(1, 5, 0.35).name == "self_speculative[1x5>0.35]"


def test_self_speculative_stops_and_keeps_budget(dist1):
    from megatron.early_exit.inference import SelfSpeculative

    model = build_model()
    greedy = _generate(model, [PROMPT], max_new_tokens=15)
    stop = greedy.tokens[0][6]
    cut = greedy.tokens[0].index(stop) + 1
    spec = _generate(model, [PROMPT], SelfSpeculative(3, 4), max_new_tokens=15, stop_tokens=[stop])
    assert spec.tokens[0] == greedy.tokens[0][:cut]
    for n in (1, 2, 7):
        assert _generate(model, [PROMPT], SelfSpeculative(3, 4), max_new_tokens=n).tokens[0] == greedy.tokens[0][:n]
