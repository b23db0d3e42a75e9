"""Checkpoints: save, resume bit-identically, clear errors for missing checkpoints."""

import os

import pytest

from tests.conftest import launch
from tests.training_fixtures import tiny_run_flags


def run(argv):
    from megatron.early_exit.training.arguments import parse_args
    from megatron.early_exit.training.trainer import pretrain

    return pretrain(parse_args(argv, world_size=1))


def test_resume_is_bitwise_identical_single_process(dist1, corpus, tmp_path):
    base = {"--hidden-dropout": 0.1, "--eval-iters": 0}
    straight = run(tiny_run_flags(corpus, iters=6, **base))
    run(tiny_run_flags(corpus, iters=3, **base, **{"--save": str(tmp_path), "--lr-decay-iters": 6}))
    assert open(tmp_path / "latest_checkpointed_iteration.txt").read() == "3"
    assert sorted(os.listdir(tmp_path)) == ["iter_0000003", "latest_checkpointed_iteration.txt"]  # no .tmp left
    resumed = run(tiny_run_flags(corpus, iters=6, **base, **{"--load": str(tmp_path)}))
    assert [h["lm loss"] for h in resumed.history] == [h["lm loss"] for h in straight.history[3:]]
    assert [h["early loss [1]"] for h in resumed.history] == [h["early loss [1]"] for h in straight.history[3:]]


def test_missing_checkpoint_is_named(dist1, corpus, tmp_path):
    from megatron.early_exit.training.checkpointing import CheckpointError

    with pytest.raises(CheckpointError, match=f"--load {tmp_path}: no latest_checkpointed_iteration.txt"):
        run(tiny_run_flags(corpus, iters=4, **{"--load": str(tmp_path)}))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(CheckpointError, match="iter_0000007 named by latest_checkpointed_iteration.txt does not exist"):
        run(tiny_run_flags(corpus, iters=4, **{"--load": str(tmp_path)}))


@pytest.fixture(scope="module")
def checkpoint_runs(corpus, launch_dir):
    return launch("tests.multiproc.cases_checkpoint", 2, launch_dir, env={"EE_TEST_DATA": corpus})


@pytest.mark.multiproc
@pytest.mark.parametrize("case", ["case_resume_tp2", "case_resume_pp2", "case_resume_dp2"])
def test_resume_under_two_processes(checkpoint_runs, case):
    assert checkpoint_runs[case]["ok"], checkpoint_runs[case]["error"]
