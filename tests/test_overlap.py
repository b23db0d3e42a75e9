"""--overlap-grad-reduce and --overlap-param-gather give the losses and weights of the
same run without them (DP=2, PP=2 x DP=2 and interleaved PP=2 x 2 chunks x DP=2,
distributed optimizer, tied exits)."""

import pytest

from tests.conftest import launch


def _check(result):
    assert result["ok"], result["error"]
    metrics = result["metrics"]
    assert all(h["lm loss"] > 0 for h in metrics["history"])
    for name in ("grad_reduce", "both"):
        assert metrics[name]["loss_diff"] <= 1e-6, (name, metrics[name])
        assert metrics[name]["param_diff"] <= 1e-6, (name, metrics[name])


@pytest.mark.multiproc
@pytest.mark.slow
def test_overlap_dp2_equals_no_overlap(corpus, launch_dir):
    _check(launch("tests.multiproc.cases_overlap", 2, launch_dir, env={"EE_TEST_DATA": corpus})["case_dp2"])


@pytest.mark.multiproc
@pytest.mark.slow
def test_overlap_pp2_dp2_equals_no_overlap(corpus, launch_dir):
    _check(
        launch("tests.multiproc.cases_overlap_pipeline", 4, launch_dir, env={"EE_TEST_DATA": corpus})["case_pp2_dp2"]
    )


@pytest.mark.multiproc
@pytest.mark.slow
def test_overlap_interleaved_pp2_v2_dp2_equals_no_overlap(corpus, launch_dir):
    """One DDP per model chunk: each chunk's buckets reduce in its own last backward and
    gather before its own forward."""
    result = launch("tests.multiproc.cases_overlap_interleaved", 4, launch_dir, env={"EE_TEST_DATA": corpus})[
        "case_pp2_v2_dp2"
    ]
    _check(result)
    assert result["metrics"]["chunks"] == 2


def test_param_gather_needs_distributed_optimizer(corpus):
    from megatron.early_exit.errors import ConfigError
    from megatron.early_exit.training.arguments import parse_args
    from tests.training_fixtures import tiny_run_flags

    with pytest.raises(ConfigError, match="--overlap-param-gather needs --use-distributed-optimizer"):
        parse_args(tiny_run_flags(corpus, **{"--overlap-param-gather": None}), world_size=2)
