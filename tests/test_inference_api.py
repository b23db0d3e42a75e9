"""The inference API's small parts and its errors: cache, confidence, sampling, requests,
calibration sweeps."""

import math
import os

import pytest
import torch

from tests.inference_models import NUM_LAYERS, PROMPT, PROMPTS, build_model, save_tiny_checkpoint
from tests.inference_models import generate_tokens as _generate

# -- KV cache ------------------------------------------------------------------------------


def test_kv_cache_update_by_position_and_crop():
    from megatron.early_exit.inference import KVCache

    cache = KVCache(num_layers=2, max_batch=3, max_seq=8, num_kv_heads=2, head_dim=4)
    rows = torch.tensor([2, 0])
    write_pos = torch.tensor([[cache.trash_slot, 4], [6, 5]])  # [c, b]: row 2 has one entry, row 0 two
    k = torch.arange(2 * 2 * 2 * 4, dtype=torch.float).view(2, 2, 2, 4)
    cache.update(1, rows, write_pos, k, -k)
    assert torch.equal(cache.k[1][2, :, 6], k[1, 0]) and torch.equal(cache.k[1][0, :, 4], k[0, 1])
    assert torch.equal(cache.v[1][0, :, 5], -k[1, 1])
    assert cache.k[1][2, :, :6].abs().sum() == 0 and cache.k[0].abs().sum() == 0  # nothing else written
    keys, values = cache.keys_values(1, torch.tensor([0, 2]), 7)
    assert keys.shape == (2, 2, 7, 4) and torch.equal(keys[1, :, 6], k[1, 0])
    view_keys, _ = cache.keys_values(1, torch.tensor([1, 2]), 7, row_slice=slice(1, 3))
    assert view_keys.data_ptr() == cache.k[1][1].data_ptr()  # consecutive rows: a view
    cache.set_length(0, [0, 2], [7, 7])
    cache.set_length(1, [0, 2], [5, 7])
    cache.crop(2, 3)
    assert [cache.lengths[0][2], cache.lengths[1][2], cache.lengths[1][0]] == [3, 3, 5]


# -- confidence measures -----------------------------------------------------------------------


def test_confidence_measures_order_confident_above_unsure():
    from megatron.early_exit.inference.confidence import CONFIDENCE_MEASURES, ExitView

    peaked = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    two_way = torch.tensor([[5.0, 5.0, 0.0, 0.0]])
    uniform = torch.zeros(1, 4)

    def at(name, logits):  # every measure takes one ExitView
        return float(CONFIDENCE_MEASURES[name](ExitView.from_logits(logits))[0])

    for name in ("max_prob", "margin", "entropy"):
        assert at(name, peaked) > at(name, two_way) >= at(name, uniform), name
    assert math.isclose(at("max_prob", uniform), 0.25, abs_tol=1e-6)
    assert at("margin", two_way) < 1e-6
    assert abs(at("entropy", uniform)) < 1e-6
    assert at("entropy", peaked) > 0.99
    h = torch.tensor([[1.0, 2.0, 3.0]])
    saturation = CONFIDENCE_MEASURES["saturation"]
    assert math.isclose(float(saturation(ExitView(1, h, 2 * h))), 1.0, abs_tol=1e-6)
    assert math.isclose(float(saturation(ExitView(1, h, -h))), -1.0, abs_tol=1e-6)
    assert float(saturation(ExitView(1, h, None))) == -math.inf  # nothing to compare before a stage's first layer


def test_gated_max_prob_projects_only_the_rows_its_gate_passes():
    """The hidden-state gate decides which rows' vocabulary projection is computed; those rows
    get their top-1 probability, the others -inf, and a batch the gate stops projects nothing."""
    from megatron.early_exit.inference.confidence import ExitView, gated_top1_probability, top1_probability
    from megatron.early_exit.inference.learned_confidence import ConfidenceEstimator

    estimator = ConfidenceEstimator(3, [2], use_logits=False, gate_threshold=0.5)
    with torch.no_grad():
        estimator.heads["2"].weight.copy_(torch.tensor([[4.0, 0.0, 0.0]]))
        estimator.heads["2"].bias.zero_()
    hidden = torch.tensor([[1.0, 0.2, 0.1], [-1.0, 0.3, 0.2], [2.0, -0.1, 0.4]])  # scores > .5, < .5, > .5
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    asked = []

    def project(rows):
        asked.append(None if rows is None else rows.tolist())
        return logits if rows is None else logits[rows]

    measure = gated_top1_probability(estimator)
    view = ExitView(2, hidden, None, project)
    got = measure(view)
    assert asked == [[0, 2]]
    assert torch.allclose(got[[0, 2]], top1_probability(logits[[0, 2]])) and got[1] == -math.inf
    assert torch.equal(view.projected()[[0, 2]], logits[[0, 2]])
    asked.clear()
    assert (measure(ExitView(2, -hidden.abs(), None, project)) == -math.inf).all() and asked == []


def test_gate_on_the_host_equals_the_classifier_score_against_the_threshold():
    """The cheap gate (a dot product and a norm compared on the host) decides as the
    classifier's sigmoid score against the threshold does, at any threshold and batch."""
    from megatron.early_exit.inference.learned_confidence import ConfidenceEstimator

    g = torch.Generator().manual_seed(1)
    estimator = ConfidenceEstimator(16, [2], use_logits=False)
    with torch.no_grad():
        estimator.heads["2"].weight.copy_(torch.randn(1, 16, generator=g))
        estimator.heads["2"].bias.fill_(0.3)
    hidden = 3 * torch.randn(40, 16, generator=g)
    scores = estimator(2, None, hidden)
    for t in (0.1, 0.4, 0.5, 0.7, 0.95):
        margin = (scores - t).abs() > 1e-5  # rounding may differ only at the boundary
        got = torch.tensor(estimator.gate(2, hidden, t))
        assert torch.equal(got[margin], (scores >= t)[margin])
        assert 0 < int(got.sum()) < 40 or t in (0.1, 0.95)  # the middle thresholds split the rows
    assert estimator.gate(2, hidden, 0.0) == [True] * 40 and estimator.gate(2, hidden, 1.0) == [False] * 40


# -- sampling ------------------------------------------------------------------------------------


def test_sampling_is_seeded_and_degenerates_to_greedy(dist1):
    from megatron.early_exit.inference import EarlyExit, SamplingParams

    model = build_model()
    greedy = _generate(model, PROMPTS, max_new_tokens=12).tokens
    for params in (
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.0, top_p=1e-6, seed=1),
        SamplingParams(temperature=1e-4, seed=2),
    ):
        assert _generate(model, PROMPTS, max_new_tokens=12, sampling=params).tokens == greedy
    sampled = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=3)
    first = _generate(model, PROMPTS, EarlyExit(0.35), max_new_tokens=12, sampling=sampled)
    again = _generate(model, PROMPTS, EarlyExit(0.35), max_new_tokens=12, sampling=sampled)
    other = _generate(
        model, PROMPTS, EarlyExit(0.35), max_new_tokens=12, sampling=SamplingParams(temperature=1.0, seed=4)
    )
    assert first.tokens == again.tokens and first.exit_layers == again.exit_layers
    assert first.tokens != greedy and other.tokens != first.tokens


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    from megatron.early_exit.inference.sampling import SamplingParams, select_tokens

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, -1)
    g = torch.Generator().manual_seed(0)
    top2 = select_tokens(logits, SamplingParams(temperature=1.0, top_k=2), g)[0]
    assert set(top2.tolist()) == {0, 1}
    nucleus = select_tokens(logits, SamplingParams(temperature=1.0, top_p=0.85), g)[0]
    assert set(nucleus.tolist()) == {0, 1, 2}  # 0.5 + 0.3 < 0.85: the third token is needed
    tokens, logprobs = select_tokens(logits[:1], SamplingParams(), None)
    assert tokens.tolist() == [0] and math.isclose(float(logprobs), math.log(0.5), rel_tol=1e-5)


# -- bad requests ------------------------------------------------------------------------------------


def test_bad_requests_raise_config_errors(dist1):
    from megatron.early_exit.errors import ConfigError
    from megatron.early_exit.inference import EarlyExit, FullDepth, SamplingParams, SelfSpeculative, generate

    model = build_model()
    bad = {
        "no prompts": lambda: generate(model, [], FullDepth()),
        "empty prompt": lambda: generate(model, [PROMPT, []], FullDepth()),
        "token outside the vocabulary": lambda: generate(model, [[1, 96]], FullDepth()),
        "context too long": lambda: generate(model, [PROMPT], FullDepth(), max_new_tokens=60),
        "no new tokens": lambda: generate(model, [PROMPT], FullDepth(), max_new_tokens=0),
        "negative threshold": lambda: EarlyExit(threshold=-0.1),
        "NaN threshold": lambda: EarlyExit(threshold=float("nan")),
        "unknown measure": lambda: EarlyExit(0.5, measure="perplexity"),
        "unknown kv strategy": lambda: EarlyExit(0.5, kv="copy"),
        "unknown exit layer": lambda: generate(model, [PROMPT], EarlyExit(0.5, exit_layers=(2,))),
        "unknown draft exit": lambda: generate(model, [PROMPT], SelfSpeculative(exit_layer=2)),
        "no drafts": lambda: SelfSpeculative(exit_layer=1, num_draft=0),
        "draft threshold above 1": lambda: SelfSpeculative(exit_layer=1, draft_threshold=1.5),
        "negative temperature": lambda: SamplingParams(temperature=-1.0),
        "top_p zero": lambda: SamplingParams(temperature=1.0, top_p=0.0),
    }
    for name, call in bad.items():
        with pytest.raises(ConfigError) as err:
            call()
        assert str(err.value), name
    with pytest.raises(ConfigError, match="not an exit of this model"):
        generate(model, [PROMPT], EarlyExit(0.5, exit_layers=(2,)))
    with pytest.raises(ConfigError, match="too long"):
        generate(model, [PROMPT], FullDepth(), max_new_tokens=60)


def test_unsupported_models_are_refused(dist1):
    from megatron.early_exit.config import EarlyExitConfig
    from megatron.early_exit.errors import ConfigError
    from megatron.early_exit.inference import generate
    from tests.helpers import build_ee_gpt, tiny_transformer_config

    model = build_ee_gpt(tiny_transformer_config(), EarlyExitConfig(), seq_length=32)
    from megatron.early_exit.inference import EarlyExit

    with pytest.raises(ConfigError, match="needs a model with exits"):
        generate(model, [PROMPT], EarlyExit(0.5), max_new_tokens=2)


def test_generate_restores_training_mode(dist1):
    model = build_model()
    model.train()
    try:
        _generate(model, [PROMPT], max_new_tokens=2)
        assert model.training
    finally:
        model.eval()


# -- calibration -------------------------------------------------------------------------------------


def test_sweep_reports_agreement_and_picks_the_fastest_agreeing_threshold(dist1):
    from megatron.early_exit.inference import EarlyExit, SelfSpeculative
    from megatron.early_exit.inference.calibration import format_table, pick_fastest, sweep, token_agreement

    assert token_agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]]) == 0.75
    assert token_agreement([[1, 2]], [[1]]) == 0.5
    model = build_model()
    strategies = [EarlyExit(t) for t in (1.5, 0.35, 0.0)] + [SelfSpeculative(3, 2)]
    lines = []
    points = sweep(model, PROMPTS[:2], strategies, max_new_tokens=10, progress=lines.append)
    full, never, some, always, spec = points
    assert len(lines) == 5 and full.speedup == 1.0 and full.agreement == 1.0
    assert never.agreement == 1.0 and never.mean_exit_layer == NUM_LAYERS and never.ideal_speedup == 1.0
    assert always.mean_exit_layer == 1.0 and always.ideal_speedup == NUM_LAYERS  # threshold 0: first exit
    assert always.agreement < some.agreement <= 1.0
    assert full.consistency == never.consistency == spec.consistency == 1.0
    assert always.consistency < 1.0
    assert spec.agreement == 1.0 and spec.acceptance is not None and spec.ideal_speedup is None
    assert pick_fastest(points, 1.01) is None
    chosen = pick_fastest(points, some.agreement)
    assert chosen.agreement >= some.agreement
    assert chosen.tokens_per_second == max(p.tokens_per_second for p in points if p.agreement >= some.agreement)
    assert pick_fastest(points, 1.0, "consistency").consistency == 1.0
    assert "agreement" in format_table(points).splitlines()[0]


# -- loading a pretraining checkpoint -------------------------------------------------------------


def test_load_model_rebuilds_a_pretraining_checkpoint(dist1, tmp_path):
    from megatron.early_exit.errors import ConfigError
    from megatron.early_exit.inference import EarlyExit, generate
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.sharding import full_state_dict

    saved = save_tiny_checkpoint(str(tmp_path)).eval()
    model, tokenizer, args = load_model(str(tmp_path))
    assert args.exit_layer_nums == [1, 2] and tokenizer.vocab_size == 100
    expected = full_state_dict(saved)
    assert all(torch.equal(v, expected[k]) for k, v in full_state_dict(model).items())
    for strategy in (EarlyExit(2.0), EarlyExit(0.3)):
        assert generate(model, [PROMPT], strategy, 8).tokens == generate(saved, [PROMPT], strategy, 8).tokens
    with pytest.raises(ConfigError, match="not a checkpoint"):
        load_model(str(tmp_path / "missing"))


def test_calibrate_threshold_tool_picks_a_threshold(dist1, tmp_path, monkeypatch, capsys):
    import importlib.util
    import sys

    save_tiny_checkpoint(str(tmp_path))
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "calibrate_threshold.py")
    spec = importlib.util.spec_from_file_location("calibrate_threshold", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # the tool installs its own; restore it after
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "calibrate_threshold.py",
            "--load",
            str(tmp_path),
            "--prompt",
            "5 17 3 9 22",
            "--prompt",
            "40 2 77",
            "--max-new-tokens",
            "6",
            "--thresholds",
            "2",
            "0.3",
            "0",
            "--min-agreement",
            "1.0",
            "--output-json",
            str(tmp_path / "out.json"),
        ],
    )
    with pytest.raises(SystemExit) as done:
        tool.main()
    out = capsys.readouterr().out
    assert done.value.code == 0 and "chosen threshold:" in out
    import json

    report = json.load(open(tmp_path / "out.json"))
    assert report["chosen"] in (2.0, 0.3, 0.0) and len(report["points"]) == 4
    chosen = [p for p in report["points"] if p["threshold"] == report["chosen"]][0]
    assert chosen["agreement"] == 1.0
