"""Checkpoints: save, resume bit-identically, clear errors for missing checkpoints."""

import os

import pytest
import torch

from tests.conftest import case_output_dir, launch_grouped
from tests.training_fixtures import VOCAB, run_training, tiny_run_flags

BASE = {"--hidden-dropout": 0.1, "--eval-iters": 0}
losses = lambda history: [e[k] for e in history for k in sorted(e) if "loss" in k]  # noqa: E731


@pytest.fixture(scope="module")
def straight_and_saved(dist1, corpus, tmp_path_factory):
    """20 iterations straight, and the first 10 of the same run saved (with dropout)."""
    root = str(tmp_path_factory.mktemp("saved"))
    straight = run_training(tiny_run_flags(corpus, iters=20, **BASE))
    first = run_training(tiny_run_flags(corpus, iters=10, **BASE, **{"--save": root, "--lr-decay-iters": 20}))
    return straight, first, root


def test_resume_is_bitwise_identical_single_process(straight_and_saved, corpus, tmp_path):
    straight, first, root = straight_and_saved
    assert open(os.path.join(root, "latest_checkpointed_iteration.txt")).read() == "10"
    assert sorted(os.listdir(root)) == ["iter_0000010", "latest_checkpointed_iteration.txt"]  # no .tmp left
    resumed = run_training(tiny_run_flags(corpus, iters=20, **BASE, **{"--load": root}))
    assert len(resumed.history) == 10
    assert losses(first.history + resumed.history) == losses(straight.history)
    assert any(k.startswith("early loss") for k in straight.history[0])


def test_no_load_optim_keeps_iteration_and_weights_but_not_the_optimizer(straight_and_saved, corpus):
    straight, _, root = straight_and_saved
    resumed = run_training(tiny_run_flags(corpus, iters=20, **BASE, **{"--load": root, "--no-load-optim": None}))
    assert len(resumed.history) == 10
    # The first loss is computed before any step: same weights, data and dropout masks.
    assert resumed.history[0]["lm loss"] == straight.history[10]["lm loss"]
    # A fresh Adam state (and scheduler at its start) takes different steps.
    assert resumed.history[2]["lm loss"] != straight.history[12]["lm loss"]


def test_no_load_rng_draws_other_dropout_masks(straight_and_saved, corpus):
    straight, _, root = straight_and_saved
    resumed = run_training(tiny_run_flags(corpus, iters=20, **BASE, **{"--load": root, "--no-load-rng": None}))
    assert len(resumed.history) == 10
    assert resumed.history[0]["lm loss"] != straight.history[10]["lm loss"]


def test_finetune_loads_weights_only_and_starts_at_zero(straight_and_saved, corpus):
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.sharding import full_state_dict

    _, _, root = straight_and_saved
    # lr 0: the weights after one step are the loaded ones.
    tuned = run_training(
        tiny_run_flags(
            corpus,
            iters=1,
            **BASE,
            **{"--load": root, "--finetune": None, "--lr": 0, "--min-lr": 0, "--lr-warmup-iters": 0},
        )
    )
    assert len(tuned.history) == 1  # iteration counter restarted
    saved, _, _ = load_model(root)
    got, want = full_state_dict(tuned.model.module), full_state_dict(saved)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_use_checkpoint_args_rebuilds_the_model(straight_and_saved, corpus):
    from megatron.early_exit.training.arguments import parse_args

    _, _, root = straight_and_saved
    argv = [
        "--load",
        root,
        "--use-checkpoint-args",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "8",
        "--train-iters",
        "20",
        "--lr",
        "1e-2",
        "--data-path",
        corpus,
        "--split",
        "90,10,0",
        "--eval-iters",
        "0",
    ]
    args = parse_args(argv, world_size=1)
    assert (args.num_layers, args.hidden_size, args.exit_layer_nums, args.swiglu, args.normalization) == (
        4,
        32,
        [1, 2],
        True,
        "RMSNorm",
    )
    assert args.tokenizer_type == "NullTokenizer" and args.vocab_size == VOCAB
    # Flags given on the command line win over the stored ones.
    assert parse_args(argv + ["--exit-layer-nums", "1", "2", "3"], world_size=1).exit_layer_nums == [1, 2, 3]


def test_mismatched_checkpoint_lists_every_difference(straight_and_saved, corpus):
    from megatron.early_exit.checkpoint.errors import CheckpointError

    _, _, root = straight_and_saved
    with pytest.raises(CheckpointError) as err:
        run_training(
            tiny_run_flags(
                corpus,
                iters=12,
                **{"--load": root, "--hidden-size": 64, "--exit-layer-nums": "1 3", "--use-exit-mlp": None},
            )
        )
    text = str(err.value)
    assert "--hidden-size: checkpoint 32, now 64" in text
    assert "exits at layers [2] that this model lacks" in text
    assert "--use-exit-mlp: checkpoint False, now True" in text


def test_checkpoint_without_exits_loads_into_a_model_with_exits(dist1, corpus, tmp_path):
    from megatron.early_exit.checkpoint.errors import CheckpointError
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.sharding import full_state_dict

    plain = {"--exit-layer-nums": False, "--exit-layer-weight": False, "--use-exit-norm": False, "--eval-iters": 0}
    run_training(tiny_run_flags(corpus, iters=3, **plain, **{"--save": str(tmp_path)}))
    with pytest.raises(CheckpointError, match=r"exits at layers \[1, 2\] are new .*add --finetune or --no-load-optim"):
        run_training(tiny_run_flags(corpus, iters=4, **{"--load": str(tmp_path), "--eval-iters": 0}))
    flags = {
        "--load": str(tmp_path),
        "--finetune": None,
        "--lr": 0,
        "--min-lr": 0,
        "--lr-warmup-iters": 0,
        "--eval-iters": 0,
    }
    tuned = run_training(tiny_run_flags(corpus, iters=1, **flags))
    saved, _, _ = load_model(str(tmp_path))
    got, want = full_state_dict(tuned.model.module), full_state_dict(saved)
    assert all(torch.equal(got[k], want[k]) for k in want)  # the backbone came from the checkpoint
    new = [k for k in got if k.startswith("exits.")]
    assert new and not any(k in want for k in new)  # the exits are new and initialised
    assert any(got[k].abs().sum() > 0 for k in new)


def test_weights_only_checkpoint_needs_finetune(dist1, corpus, tmp_path):
    from megatron.early_exit.checkpoint.errors import CheckpointError
    from megatron.early_exit.checkpoint.writer import save_weights
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.training.arguments import build_run_config, parse_args
    from megatron.early_exit.training.trainer import build_model

    args = parse_args(tiny_run_flags(corpus, iters=4), world_size=1)
    save_weights(str(tmp_path), vars(args), build_model(build_run_config(args), torch.device("cpu"), VOCAB))
    with pytest.raises(CheckpointError, match="holds weights only .*add --finetune or --no-load-optim"):
        run_training(tiny_run_flags(corpus, iters=4, **{"--load": str(tmp_path)}))
    assert (
        len(
            run_training(
                tiny_run_flags(corpus, iters=3, **{"--load": str(tmp_path), "--finetune": None, "--eval-iters": 0})
            ).history
        )
        == 3
    )
    assert load_model(str(tmp_path))[2].num_layers == 4


def test_keep_last_removes_older_checkpoints(dist1, corpus, tmp_path):
    run_training(
        tiny_run_flags(
            corpus, iters=8, **{"--save": str(tmp_path), "--save-interval": 2, "--keep-last": 2, "--eval-iters": 0}
        )
    )
    assert sorted(os.listdir(tmp_path)) == ["iter_0000006", "iter_0000008", "latest_checkpointed_iteration.txt"]


@pytest.mark.parametrize("damage", ["truncate", "delete", "common"])
def test_damaged_checkpoint_names_the_file(straight_and_saved, corpus, tmp_path, damage):
    import glob
    import shutil

    from megatron.early_exit.checkpoint.errors import CheckpointError

    root = str(tmp_path / "copy")
    shutil.copytree(straight_and_saved[2], root)
    shard = sorted(glob.glob(os.path.join(root, "iter_0000010", "*.distcp")))[-1]
    if damage == "truncate":
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) // 2)
        expected = f"checkpoint shard {shard} is truncated"
    elif damage == "delete":
        os.remove(shard)
        expected = f"checkpoint shard {shard} is missing"
    else:
        shard = os.path.join(root, "iter_0000010", "common.pt")
        os.remove(shard)
        expected = f"checkpoint file {shard} is missing"
    with pytest.raises(CheckpointError) as err:
        run_training(tiny_run_flags(corpus, iters=20, **BASE, **{"--load": root}))
    assert expected in str(err.value)


def test_missing_checkpoint_is_named(dist1, corpus, tmp_path):
    from megatron.early_exit.checkpoint.errors import CheckpointError

    with pytest.raises(CheckpointError, match=f"--load {tmp_path}: no latest_checkpointed_iteration.txt"):
        run_training(tiny_run_flags(corpus, iters=4, **{"--load": str(tmp_path)}))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(CheckpointError, match="iter_0000007 named by latest_checkpointed_iteration.txt does not exist"):
        run_training(tiny_run_flags(corpus, iters=4, **{"--load": str(tmp_path)}))


@pytest.fixture(scope="module")
def checkpoint_runs(request):
    return launch_grouped("tests.multiproc.cases_checkpoint", request)


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "case",
    [
        "case_resume_tp2",
        "case_resume_pp2",
        "case_resume_dp2",
        "case_resume_dp2_distributed_optimizer",
        "case_distributed_optimizer_state_gathered_on_one_rank",
    ],
)
def test_resume_under_two_processes(checkpoint_runs, case):
    assert checkpoint_runs[case]["ok"], checkpoint_runs[case]["error"]


@pytest.fixture(scope="module")
def reshard_runs(request):
    """One 4-process launch (TP=2 x PP=2) that saves its own checkpoint and reads the TP=1
    one of conftest's reshard_inputs."""
    results = launch_grouped("tests.multiproc.cases_reshard", request)
    return case_output_dir(request, "tests.multiproc.cases_reshard"), results


@pytest.mark.multiproc
def test_tp2_pp2_checkpoint_gives_the_same_logits_at_tp1(reshard_runs):
    from megatron.early_exit.inference.loading import load_model
    from tests.multiproc.cases_reshard import TOKENS, logits_by_layer

    root, results = reshard_runs
    case = results["case_tp2_pp2_saves_a_checkpoint_with_its_logits"]
    assert case["ok"], case["error"]
    model, _, _ = load_model(os.path.join(root, "tp2pp2"))
    got, want = logits_by_layer(model, TOKENS), torch.load(os.path.join(root, "tp2pp2_logits.pt"))
    assert sorted(got) == ["exit 1", "exit 3", "final"] == sorted(want)
    assert max(float((got[k] - want[k]).abs().max()) for k in want) < 1e-4
    # Both layouts trained the same model (same seed, data, layout-invariant init).
    assert float((got["final"] - torch.load(os.path.join(root, "tp1_logits.pt"))["final"]).abs().max()) < 1e-3


@pytest.mark.multiproc
@pytest.mark.parametrize("case", ["case_tp2_pp2_reads_a_tp1_checkpoint", "case_tp2_pp2_generates_what_tp1_generates"])
def test_tp1_checkpoint_at_tp2_pp2(reshard_runs, case):
    assert reshard_runs[1][case]["ok"], reshard_runs[1][case]["error"]


def _fresh_process_env() -> dict:
    """This environment without the single-process world's rendezvous (a child starts its own)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return dict(env, PYTHONWARNINGS="ignore")


# before_rename is also killed in make test by test_reliability_checkpoints' kill -9 test.
@pytest.mark.parametrize("moment", [pytest.param("before_rename", marks=pytest.mark.slow), "before_marker"])
def test_save_killed_midway_leaves_the_previous_checkpoint(dist1, corpus, tmp_path, moment):
    import signal
    import subprocess
    import sys
    import time

    root, paused = str(tmp_path / "ck"), tmp_path / "paused"
    flags = {"--save": root, "--save-interval": 2, "--eval-iters": 0}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoint_pause.py")  # the trainer, paused
    env = dict(_fresh_process_env(), OMP_NUM_THREADS="1")
    cmd = [sys.executable, script, f"{moment}:4:{paused}", *tiny_run_flags(corpus, iters=6, **flags)]
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240
    while not paused.exists():
        assert proc.poll() is None, f"the trainer ended before the save of iteration 4: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, "the save of iteration 4 never reached the pause"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and dist_checkpointing's helper process
    proc.wait()
    assert open(os.path.join(root, "latest_checkpointed_iteration.txt")).read() == "2"
    assert os.path.isdir(os.path.join(root, "iter_0000004.tmp" if moment == "before_rename" else "iter_0000004"))

    resumed = run_training(tiny_run_flags(corpus, iters=6, **flags, **{"--load": root}))
    assert len(resumed.history) == 4  # iterations 3..6, from the checkpoint of iteration 2
    assert sorted(os.listdir(root)) == [
        "iter_0000002",
        "iter_0000004",
        "iter_0000006",
        "latest_checkpointed_iteration.txt",
    ]


def _tool(name, *argv):
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "checkpoint", name)
    return subprocess.run(
        [sys.executable, script, *argv], capture_output=True, text=True, timeout=600, env=_fresh_process_env()
    )


@pytest.mark.slow
@pytest.mark.multiproc
def test_reshard_and_inspect_tools(straight_and_saved, tmp_path):
    import json

    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.sharding import full_state_dict

    root = straight_and_saved[2]
    out = str(tmp_path / "tp2")
    done = _tool("reshard.py", "--load", root, "--save", out, "--target-tensor-parallel-size", "2", "--weights-only")
    assert done.returncode == 0 and "every rank read its weights back identically" in done.stdout, done.stderr[-3000:]
    want, got = full_state_dict(load_model(root)[0]), full_state_dict(load_model(out)[0])
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    info = json.loads(_tool("inspect.py", out, "--json").stdout)
    assert (info["iteration"], info["has_optimizer"], info["exits"]) == (10, False, [1, 2])
    assert info["saved_layout"] == {"tensor": 2, "pipeline": 1, "data": 1}
    assert info["tensors"]["exits.1.norm.weight"]["shape"] == [32]
    assert info["tensors"]["decoder.layers.3.mlp.linear_fc2.weight"]["shape"] == [
        32,
        64,
    ]  # --swiglu: Megatron-LM's FFN of 2/3 x 4 x 32, a multiple of 64
    assert info["parameters"] == sum(v.numel() for v in got.values())
    text = _tool("inspect.py", root).stdout
    assert "iteration         10" in text and "optimizer state   yes" in text and "exits             [1, 2]" in text

    missing = _tool("inspect.py", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and missing.stderr.strip().splitlines()[-1].startswith("error: checkpoint file")
