"""Learn-then-Test calibration: the Hoeffding-Bentkus p-value and fixed-sequence testing
against values computed here independently, and the whole procedure on a tiny model."""

import json
import math
from fractions import Fraction

import pytest
import torch

from megatron.early_exit.inference.learn_then_test import (
    TestedCandidate,
    binomial_cdf,
    fixed_sequence_test,
    hoeffding_bentkus_pvalue,
    read_exit_thresholds,
)


def _binomial_cdf_exact(k, n, p):
    p = Fraction(p)
    return float(sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(0, k + 1)))


@pytest.mark.parametrize("k,n,p", [(0, 10, 0.05), (3, 20, 0.1), (7, 40, 0.05), (25, 100, 0.2), (12, 12, 0.3)])
def test_binomial_cdf_equals_the_exact_sum(k, n, p):
    assert binomial_cdf(k, n, p) == pytest.approx(_binomial_cdf_exact(k, n, p), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize(
    "risk,n,delta",
    [(0.0, 20, 0.05), (0.01, 50, 0.05), (0.02, 200, 0.05), (0.03, 30, 0.1), (0.049, 100, 0.05), (0.2, 10, 0.1)],
)
def test_hoeffding_bentkus_pvalue_by_its_formula(risk, n, delta):
    # min(exp(-n h1(min(R, d), d)), e P(Bin(n, d) <= ceil(n R))), h1 the Bernoulli KL divergence.
    a = min(risk, delta)
    h1 = (a * math.log(a / delta) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - delta))
    expected = min(1.0, math.exp(-n * h1), math.e * _binomial_cdf_exact(math.ceil(n * risk - 1e-9), n, delta))
    assert hoeffding_bentkus_pvalue(risk, n, delta) == pytest.approx(expected, rel=1e-9)


def test_pvalue_properties():
    assert hoeffding_bentkus_pvalue(0.05, 100, 0.05) == 1.0  # risk at the bound: no evidence
    # Zero risk on n prompts: Hoeffding's term (1-d)^n (Bentkus' is e times it): 20 prompts cannot
    # certify 0.05 at confidence 0.9, 50 can.
    assert hoeffding_bentkus_pvalue(0.0, 20, 0.05) == pytest.approx(0.95**20)
    assert hoeffding_bentkus_pvalue(0.0, 50, 0.05) < 0.1
    ps = [hoeffding_bentkus_pvalue(r, 200, 0.05) for r in (0.0, 0.01, 0.02, 0.03, 0.04)]
    assert ps == sorted(ps) and ps[0] < 1e-3  # more risk, less evidence
    assert hoeffding_bentkus_pvalue(0.01, 400, 0.05) < hoeffding_bentkus_pvalue(0.01, 100, 0.05)  # more prompts, more


def test_fixed_sequence_stops_at_the_first_failure():
    asked = []

    def p_value(p):
        asked.append(p)
        return TestedCandidate(str(p), 0.0, p, False)

    last, tested = fixed_sequence_test([0.01, 0.05, 0.2, 0.01], p_value, epsilon=0.1)
    assert last == 1 and asked == [0.01, 0.05, 0.2]  # the fourth would pass but is never tested
    assert [t.valid for t in tested] == [True, True, False]
    asked.clear()
    assert fixed_sequence_test([0.5, 0.01], p_value, epsilon=0.1)[0] == -1 and asked == [0.5]
    assert fixed_sequence_test([0.01, 0.02], p_value, epsilon=0.1)[0] == 1


def test_learn_then_test_on_a_tiny_model(dist1, tmp_path):
    """Every tested candidate's p-value is the formula's at its test risk; the answer is the
    last valid one and its thresholds round-trip through the JSON the server reads."""
    from megatron.early_exit.config import EarlyExitConfig
    from megatron.early_exit.inference.learn_then_test import learn_then_test
    from tests.helpers import build_ee_gpt, tiny_transformer_config

    torch.manual_seed(0)
    model = build_ee_gpt(tiny_transformer_config(), EarlyExitConfig(exit_layer_nums=[1, 2])).eval()
    prompts = [[(7 * i + j) % 90 + 1 for j in range(6)] for i in range(8)]
    result = learn_then_test(model, prompts, "max_prob", "consistency", 0.5, 0.8, 6)
    assert (result.num_learn, result.num_test) == (4, 4) and result.tested
    for t in result.tested:
        assert t.p_value == pytest.approx(hoeffding_bentkus_pvalue(t.risk, 4, 0.5))
        assert t.valid == (t.p_value <= 0.2 + 1e-12)
    valid = [t for t in result.tested if t.valid]
    assert all(t.valid for t in result.tested[:-1])  # testing went on only while candidates passed
    assert bool(result.exit_thresholds) == bool(valid)
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps(result.to_json()))
    assert read_exit_thresholds(str(path)) == result.exit_thresholds


def test_server_takes_calibrated_thresholds_when_a_request_sets_none(tmp_path):
    from megatron.early_exit.errors import ConfigError
    from megatron.early_exit.server.jobs import ModelLimits, build_strategy
    from megatron.early_exit.server.launch import _exit_thresholds
    from megatron.early_exit.server.schemas import EarlyExitOptions

    path = tmp_path / "t.json"
    path.write_text(json.dumps({"exit_thresholds": {"2": 0.9}, "criterion": "consistency"}))

    class Stored:
        exit_layer_nums = [2, 4]

    calibration = _exit_thresholds(str(path), Stored)
    assert calibration == {"exit_thresholds": {2: 0.9}, "exit_thresholds_measure": None}
    limits = ModelLimits("m", 96, 6, (2, 4), 64, 4, 32, **calibration)
    calibrated = build_strategy(EarlyExitOptions(use_early_exit=True), limits, greedy=True)
    assert calibrated.threshold_of(2) == 0.9 and calibrated.threshold_of(4) > 1  # exit 4 left out: never
    own = build_strategy(EarlyExitOptions(use_early_exit=True, early_exit_thres=0.5), limits, greedy=True)
    assert own.threshold_of(4) == 0.5  # a request's own threshold wins
    Stored.exit_layer_nums = [4]
    with pytest.raises(ConfigError, match=r"--exit-thresholds-file .*exits \[2\] are not exits of the model"):
        _exit_thresholds(str(path), Stored)
    path.write_text("{}")
    with pytest.raises(ConfigError, match=r"--exit-thresholds-file: .* has no exit_thresholds"):
        read_exit_thresholds(str(path))


def test_server_thresholds_file_brings_its_measure(tmp_path):
    """--exit-thresholds-file's thresholds are decoded with the measure they were calibrated for;
    a request naming another measure for them is refused by field."""
    from megatron.early_exit.server.jobs import ModelLimits, RequestError, build_strategy
    from megatron.early_exit.server.launch import _exit_thresholds
    from megatron.early_exit.server.schemas import EarlyExitOptions

    class Stored:
        exit_layer_nums = [1, 2]

    path = tmp_path / "t.json"
    path.write_text(json.dumps({"exit_thresholds": {"1": 0.3, "2": 0.1}, "measure": "margin"}))
    calibrated = _exit_thresholds(str(path), Stored)
    assert calibrated == {"exit_thresholds": {1: 0.3, 2: 0.1}, "exit_thresholds_measure": "margin"}
    limits = ModelLimits("tiny", 128, 4, (1, 2), 64, 4, 32, **calibrated)
    strategy = build_strategy(EarlyExitOptions(use_early_exit=True), limits, greedy=True)
    assert strategy.measure == "margin" and strategy.threshold_of(1) == 0.3
    assert build_strategy(EarlyExitOptions(use_early_exit=True, confidence="margin"), limits, True).measure == "margin"
    with pytest.raises(RequestError, match="confidence"):
        build_strategy(EarlyExitOptions(use_early_exit=True, confidence="max_prob"), limits, greedy=True)
    # A request with thresholds of its own keeps its own measure.
    own = EarlyExitOptions(use_early_exit=True, early_exit_thres=0.8, confidence="entropy")
    assert build_strategy(own, limits, greedy=True).measure == "entropy"
    # A file without a measure (older files) leaves the request's.
    path.write_text(json.dumps({"exit_thresholds": {"1": 0.3}}))
    limits = ModelLimits("tiny", 128, 4, (1, 2), 64, 4, 32, **_exit_thresholds(str(path), Stored))
    entropy = EarlyExitOptions(use_early_exit=True, confidence="entropy")
    assert build_strategy(entropy, limits, greedy=True).measure == "entropy"
    path.write_text(json.dumps({"exit_thresholds": {"1": 0.3}, "measure": "learned"}))
    with pytest.raises(Exception, match="calibrated for measure 'learned'"):
        _exit_thresholds(str(path), Stored)
