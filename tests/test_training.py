"""Pretraining: losses fall, layouts agree with one process, data blends, bad flags."""

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, launch_grouped
from tests.training_fixtures import run_training, tiny_run_flags, write_corpus


def loss_keys(entry):
    return [k for k in entry if k == "lm loss" or k.startswith("early loss")]


def test_thirty_iterations_losses_fall(dist1, corpus):
    state = run_training(tiny_run_flags(corpus, iters=30))
    first, last = state.history[0], state.history[-1]
    assert loss_keys(first) == ["lm loss", "early loss [1]", "early loss [2]"]
    for key in loss_keys(first):
        assert last[key] < 0.6 * first[key], (key, first[key], last[key])
    assert [v["iteration"] for v in state.validation] == [15, 30]
    assert state.validation[-1]["lm loss"] < state.validation[0]["lm loss"]


@pytest.fixture(scope="module")
def two_process_runs(request):
    return launch_grouped("tests.multiproc.cases_training", request)


def _assert_same_history(got, expected, tol=1e-5):
    assert len(got) == len(expected)
    for step, (g, e) in enumerate(zip(got, expected)):
        for key in loss_keys(e):
            assert abs(g[key] - e[key]) <= tol * max(1.0, abs(e[key])), (step, key, g[key], e[key])


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "case,flags",
    [
        ("case_dp2", {}),
        ("case_dp2_distributed_optimizer", {"--use-distributed-optimizer": None}),
        ("case_tp2", {}),
        ("case_tp2_sequence_parallel", {}),
        ("case_dp2_no_gloo_groups", {}),
        ("case_dp2_distributed_optimizer_no_gloo_groups", {"--use-distributed-optimizer": None}),
    ],
)
def test_two_processes_equal_one(dist1, corpus, two_process_runs, case, flags):
    result = two_process_runs[case]
    assert result["ok"], result["error"]
    reference = run_training(tiny_run_flags(corpus, iters=6, **flags))
    _assert_same_history(result["metrics"]["history"], reference.history)
    _assert_same_history(result["metrics"]["validation"], reference.validation)


def test_blend_of_two_data_paths(dist1, corpus, tmp_path):
    from megatron.early_exit.tokenizers import build_tokenizer
    from megatron.early_exit.training.arguments import build_run_config, parse_args
    from megatron.early_exit.training.data import build_datasets

    other = write_corpus(str(tmp_path), name="other", seed=1, num_docs=100)
    argv = tiny_run_flags(None, iters=4, **{"--data-path": f"0.3 {corpus} 0.7 {other}"})
    args = parse_args(argv, world_size=1)
    tokenizer = build_tokenizer("NullTokenizer", vocab_size=args.vocab_size)
    train, _, _ = build_datasets(build_run_config(args), tokenizer)
    counts = [int((train.dataset_index == i).sum()) for i in range(2)]
    assert len(train.datasets) == 2 and min(counts) > 0
    assert abs(counts[1] / sum(counts) - 0.7) < 0.1
    state = run_training(argv)
    assert len(state.history) == 4


def test_mock_data_needs_no_files(dist1):
    state = run_training(
        tiny_run_flags(None, iters=3, **{"--mock-data": None, "--tokenizer-type": False, "--vocab-size": False})
    )
    assert len(state.history) == 3 and state.history[-1]["lm loss"] > 0


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            {"--global-batch-size": 6, "--micro-batch-size": 4},
            r"--global-batch-size \(6\) is not divisible by --micro-batch-size \(4\)",
        ),
        ({"--bf16": None, "--fp16": None}, r"--bf16 and --fp16 cannot be combined"),
        ({"--data-path": "/nonexistent/corpus"}, r"--data-path: /nonexistent/corpus.bin does not exist"),
        ({"--exit-layer-nums": "2 9"}, r"--exit-layer-nums \[9\] outside 1..--num-layers \(4\)"),
        ({"--exit-layer-weight": "1.0"}, r"--exit-layer-weight has 1 values but --exit-layer-nums has 2 exits"),
        ({"--use-exit-mlp": None, "--use-exit-block": None}, r"--use-exit-mlp and --use-exit-block cannot be combined"),
        (
            {"--seq-length": 64, "--max-position-embeddings": 32},
            r"--seq-length \(64\) exceeds --max-position-embeddings \(32\)",
        ),
        ({"--tensor-model-parallel-size": 3}, r"world size 1 is not divisible by --tensor-model-parallel-size \(3\)"),
        ({"--mock-data": None}, r"--mock-data and --data-path cannot be combined"),
        ({"--fill-explicit-bubbles": None}, r"--fill-explicit-bubbles needs --pipeline-model-parallel-size > 1"),
        ({"--group-query-attention": None}, r"--group-query-attention needs --num-query-groups"),
        ({"--lr-warmup-iters": 30}, r"--lr-warmup-iters \(30\) must be smaller than --lr-decay-iters \(30\)"),
    ],
)
def test_bad_flags_are_named(corpus, overrides, message):
    from megatron.early_exit.errors import ConfigError
    from megatron.early_exit.training.arguments import parse_args

    with pytest.raises(ConfigError, match=message):
        parse_args(tiny_run_flags(corpus, **overrides), world_size=1)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from megatron.early_exit.training.arguments import parse_args

    script = os.path.join(ROOT, "pretrain_early_exit_gpt.py")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, script, *tiny_run_flags(str(tmp_path / "missing"))], capture_output=True, text=True, env=env
    )
    assert proc.returncode != 0
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"error: --data-path: {tmp_path / 'missing'}.bin does not exist (run tools/preprocess_data.py first)"
    )
    assert "Traceback" not in proc.stderr
    with pytest.raises(SystemExit) as exited:  # argparse's own error, in this process
        parse_args([*tiny_run_flags(None), "--no-such-flag"], world_size=1)
    assert exited.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_exit_tuning_trains_only_exits(dist1, corpus):
    from megatron.early_exit.sharding import full_state_dict

    initial = run_training(tiny_run_flags(corpus, iters=1, **{"--lr": 0.0, "--min-lr": 0.0, "--lr-warmup-iters": 0}))
    before = full_state_dict(initial.model.module)
    tuned = run_training(tiny_run_flags(corpus, iters=3, **{"--tune-exit": None, "--untie-exit-output-weights": None}))
    after = full_state_dict(tuned.model.module)
    assert "lm loss" not in tuned.history[-1]  # the final head is not even run
    for name in before:
        if name.startswith("exits."):
            assert not torch.equal(before[name], after[name]), name
        else:
            assert torch.equal(before[name], after[name]), name


def test_exit_weight_warm_up_follows_the_iteration(dist1, corpus):
    """The trainer hands each iteration its number: the exit weights used in the loss rise
    from --exit-layer-weight-init to --exit-layer-weight over the warm-up, then stay."""
    flags = {
        "--exit-layer-weight-init": "0.0 0.1",
        "--exit-layer-weight": "0.8 0.5",
        "--exit-layer-weight-warmup-iters": 4,
        "--eval-interval": 100,
    }
    state = run_training(tiny_run_flags(corpus, iters=6, **flags))
    for i, entry in enumerate(state.history):
        r = min(i / 4, 1.0)
        assert entry["exit weight [1]"] == pytest.approx(0.8 * r), i
        assert entry["exit weight [2]"] == pytest.approx(0.1 + 0.4 * r), i
    assert state.history[0]["exit weight [1]"] == 0.0 and state.history[-1]["exit weight [1]"] == pytest.approx(0.8)
