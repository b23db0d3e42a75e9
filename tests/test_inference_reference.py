"""The slow inference references (tests/inference_reference.py) agree with each other and
with the model's own forward."""

from tests.inference_models import build_model
from tests.inference_reference import no_cache_greedy, reference_generate


def test_reference_full_depth_equals_model_forward(dist1):
    model = build_model("tied_norm")
    prompt = [5, 17, 3, 9, 22]
    tokens, depths, logprobs = reference_generate(model, prompt, 8)
    ref_tokens, ref_logprobs = no_cache_greedy(model, prompt, 8)
    assert tokens == ref_tokens
    assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs)) < 1e-5
    assert depths == [model.config.num_layers] * 8


def test_reference_propagation_differs_from_recomputation(dist1):
    """Copied-up exit states change deeper K/V, so the two definitions give different
    log-probabilities (otherwise the two strategy tests would test one thing twice)."""
    model = build_model("tied_norm")
    prompt = [5, 17, 3, 9, 22]
    rec = reference_generate(model, prompt, 16, threshold=0.35, propagate=False)
    prop = reference_generate(model, prompt, 16, threshold=0.35, propagate=True)
    assert max(abs(a - b) for a, b in zip(rec[2], prop[2])) > 1e-3
