"""Weights & Biases never turns a user error into a traceback: a run wandb cannot start (no API
key) stops with one line naming --wandb-project, and a user error after wandb has started
(a missing --load-iteration) keeps its one line although wandb installed its own excepthook."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytest.importorskip("wandb")

FLAGS = [
    "--num-layers",
    "2",
    "--hidden-size",
    "32",
    "--num-attention-heads",
    "4",
    "--seq-length",
    "32",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "2",
    "--train-iters",
    "2",
    "--lr",
    "1e-3",
    "--mock-data",
    "--tokenizer-type",
    "NullTokenizer",
    "--vocab-size",
    "100",
    "--wandb-project",
    "p",
    "--log-interval",
    "1",
]


def _train(tmp_path, extra, **env):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | env
    env.update(HOME=str(tmp_path), PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="", WANDB_DIR=str(tmp_path))
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "pretrain_early_exit_gpt.py"),
            *FLAGS,
            "--save",
            str(tmp_path / "ckpt"),
            *extra,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc.returncode, proc.stderr


@pytest.mark.slow
def test_wandb_errors_are_one_line(tmp_path):
    rc, stderr = _train(tmp_path, [])
    assert rc != 0 and "Traceback" not in stderr, stderr[-3000:]
    assert "error: --wandb-project p: wandb could not start a run" in stderr
    rc, stderr = _train(tmp_path, ["--load", str(tmp_path / "none"), "--load-iteration", "7"], WANDB_MODE="offline")
    assert rc != 0 and "Traceback" not in stderr, stderr[-3000:]
    assert "error: --load-iteration 7: no checkpoint of that iteration" in stderr
