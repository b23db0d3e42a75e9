"""Thresholds per exit: the strategy field, its calibration, the tool and the server field."""

import importlib.util
import json
import math
import os
import sys

import pytest
import torch

from megatron.early_exit.inference import EarlyExit, InferenceConfigError, generate
from megatron.early_exit.inference.calibration import per_exit_thresholds
from tests.inference_models import PROMPT, save_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_calibration_takes_exits_shallowest_first():
    # Exit 1: sorted by confidence the agreements are 1, 1, 0, 1: at target 0.9 only the
    # two most confident tokens keep it, so its threshold is 0.8. Exit 2 sees the other two.
    confidences = {
        1: (torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([True, True, False, True])),
        2: (torch.tensor([0.1, 0.1, 0.5, 0.95]), torch.tensor([False, False, False, True])),
    }
    first, second = per_exit_thresholds(confidences, 0.9)
    assert (first.layer_number, first.threshold, first.precision, first.coverage) == (1, pytest.approx(0.8), 1.0, 0.5)
    assert (second.threshold, second.precision, second.coverage) == (pytest.approx(0.95), 1.0, 0.25)
    loose = per_exit_thresholds(confidences, 0.7)[0]
    assert loose.threshold == pytest.approx(0.6) and loose.coverage == 1.0 and loose.precision == 0.75
    never = per_exit_thresholds({1: (torch.tensor([0.9, 0.8]), torch.tensor([False, True]))}, 0.9)[0]
    assert never.threshold == math.inf and never.coverage == 0.0


def test_exit_thresholds_override_the_threshold_where_given(dist1, tmp_path):
    model = save_tiny_checkpoint(str(tmp_path)).eval()

    def run(strategy):
        result = generate(model, [PROMPT], strategy, 12)
        return result.tokens, result.exit_layers

    only_first = run(EarlyExit(0.3, exit_layers=(1,)))
    assert run(EarlyExit(2.0, exit_thresholds={1: 0.3})) == only_first  # exit 2 keeps the global 2.0: never
    assert run(EarlyExit(0.3, exit_thresholds={2: 1.5})) == only_first  # exit 2 above 1: never
    both = run(EarlyExit(0.3))
    assert run(EarlyExit(0.9, exit_thresholds={1: 0.3, 2: 0.3})) == both
    propagate = EarlyExit(0.9, kv="propagate", exit_thresholds={1: 0.3, 2: 0.3})
    assert run(propagate) == run(EarlyExit(0.3, kv="propagate"))
    assert EarlyExit(0.9, exit_thresholds={2: 0.5, 1: 0.4}) == EarlyExit(0.9, exit_thresholds={1: 0.4, 2: 0.5})
    assert "per-exit" in propagate.name
    with pytest.raises(InferenceConfigError, match=r"exit_thresholds: exit 9 is not an exit of this model"):
        generate(model, [PROMPT], EarlyExit(0.5, exit_thresholds={9: 0.5}), 4)
    with pytest.raises(InferenceConfigError, match=r"exit_thresholds\[1\] must be a number >= 0"):
        EarlyExit(0.5, exit_thresholds={1: -0.5})


def _tool():
    spec = importlib.util.spec_from_file_location(
        "calibrate_threshold", os.path.join(ROOT, "tools", "calibrate_threshold.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_calibrate_threshold_per_exit(dist1, tmp_path, monkeypatch, capsys):
    model = save_tiny_checkpoint(str(tmp_path)).eval()
    out_json = tmp_path / "per_exit.json"
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
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
            "8",
            "--per-exit",
            "--targets",
            "1.0",
            "0.5",
            "0.0",
            "--min-agreement",
            "1.0",
            "--oracle",
            "--output-json",
            str(out_json),
        ],
    )
    with pytest.raises(SystemExit) as done:
        _tool().main()
    out = capsys.readouterr().out
    assert done.value.code == 0 and "chosen exit thresholds" in out and "oracle (" in out, out
    report = json.load(open(out_json))
    oracle = report["oracle"]
    assert oracle["speedup"] > 0 and 1 <= oracle["mean_exit_layer"] <= 3 and set(oracle["coverage"]) == {"1", "2"}
    assert [p["label"] for p in report["points"]] == ["full depth", "target 1.0", "target 0.5", "target 0.0"]
    chosen = {int(k): v for k, v in report["chosen"]["exit_thresholds"].items()}
    assert set(chosen) <= {1, 2}
    # Target 0 sets exit 1's threshold at its lowest confidence on the full-depth continuations:
    # nearly every token leaves there. Decoding with the chosen thresholds reproduces the
    # agreement the tool measured.
    assert report["points"][3]["mean_exit_layer"] < 1.5 < report["points"][1]["mean_exit_layer"]
    point = [p for p in report["points"][1:] if p["agreement"] == 1.0]
    assert point, report["points"]
    prompts = [[5, 17, 3, 9, 22], [40, 2, 77]]
    full = [generate(model, [p], EarlyExit(2.0), 8).tokens[0] for p in prompts]
    again = [generate(model, [p], EarlyExit(2.0, exit_thresholds=chosen), 8).tokens[0] for p in prompts]
    assert again == full


def test_server_request_field(dist1):
    from megatron.early_exit.server.jobs import ModelLimits, RequestError, build_strategy
    from megatron.early_exit.server.schemas import EarlyExitOptions

    limits = ModelLimits("tiny", 128, 4, (1, 2), 64, 4, 32)
    options = EarlyExitOptions(use_early_exit=True, early_exit_thres=0.8, exit_thresholds={"1": 0.95, "2": 0.5})
    strategy = build_strategy(options, limits, greedy=True)
    assert strategy.threshold_of(1) == 0.95 and strategy.threshold_of(2) == 0.5
    with pytest.raises(RequestError, match="exit_thresholds"):
        build_strategy(EarlyExitOptions(use_early_exit=True, exit_thresholds={"3": 0.5}), limits, greedy=True)
    with pytest.raises(RequestError, match="exit_thresholds"):
        build_strategy(EarlyExitOptions(exit_thresholds={"1": 0.5}), limits, greedy=True)


def test_oracle_leaves_at_the_shallowest_agreeing_exit_and_keeps_full_depth_output(dist1, tmp_path):
    from megatron.early_exit.inference import FullDepth
    from megatron.early_exit.inference.calibration import exit_confidences, oracle_decode
    from megatron.early_exit.inference.confidence import get_confidence_measure

    model = save_tiny_checkpoint(str(tmp_path)).eval()
    with torch.no_grad():  # layer 3 adds nothing and exit 2 is the final head: exit 2 always agrees
        last = model.decoder.layers[2]
        last.self_attention.linear_proj.weight.zero_()
        last.mlp.linear_fc2.weight.zero_()
        model.output_layer.weight.copy_(model.embedding.word_embeddings.weight)
        model.exits["2"].norm.weight.copy_(model.decoder.final_layernorm.weight)
    prompts = [PROMPT, PROMPT[:3]]
    run = oracle_decode(model, prompts, None, 10)
    reference = [generate(model, [p], FullDepth(), 10).tokens[0] for p in prompts]
    assert run.tokens == reference and run.reference == reference and run.equals_full_depth
    # Each decoded token j >= 1 leaves where the exits of a full-depth pass first agree.
    for prompt, tokens, depths in zip(prompts, reference, run.depths):
        agrees = exit_confidences(model, [prompt + tokens], get_confidence_measure("max_prob"), None, [len(prompt) - 1])
        expected = [next((n for n, (_, ok) in agrees.items() if ok[j]), model.config.num_layers) for j in range(1, 10)]
        assert depths == expected
    assert sum(run.coverage.values()) == pytest.approx(1.0) and run.coverage[2] > 0, run.coverage
    assert run.seconds > 0 and run.full_seconds > 0
