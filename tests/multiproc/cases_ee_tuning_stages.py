"""EE-Tuning on the first pipeline stage, through pretrain_early_exit_gpt.py's own entry
point (2 processes): train a PP=2 model with exits on stage 0, then tune its exits with
--tune-exit-pipeline-parallel-size 1 from that full checkpoint. Cases run in order."""

import os

import pretrain_early_exit_gpt
from tests.training_fixtures import tiny_run_flags

DATA, OUT = os.environ.get("EE_TEST_DATA"), os.environ.get("EE_TEST_OUT")
# 4 layers on 2 stages: stage 0 holds layers 1-2 and both exits.
MODEL = {
    "--num-layers": 4,
    "--exit-layer-nums": "1 2",
    "--exit-layer-weight": "0.5 0.5",
    "--use-exit-norm": None,
    "--untie-exit-output-weights": None,
    "--eval-iters": 1,
    "--eval-interval": 100,
    "--lr-warmup-iters": 0,
}


def case_1_train_pp2():
    pretrain_early_exit_gpt.main(
        tiny_run_flags(
            DATA, iters=2, **MODEL, **{"--pipeline-model-parallel-size": 2, "--save": os.path.join(OUT, "base")}
        )
    )


def case_2_tune_exits_on_the_first_stage():
    # The layout of the whole model (PP=2) and how many of its stages to run (1: the two
    # processes become DP=2); the exit structure comes from the checkpoint.
    pretrain_early_exit_gpt.main(
        tiny_run_flags(
            None,
            iters=3,
            **{
                "--data-path": DATA,
                "--use-checkpoint-args": None,
                "--load": os.path.join(OUT, "base"),
                "--finetune": None,
                "--tune-exit": None,
                "--pipeline-model-parallel-size": 2,
                "--tune-exit-pipeline-parallel-size": 1,
                "--lr": 5e-2,
                "--lr-warmup-iters": 0,
                "--eval-iters": 1,
                "--eval-interval": 100,
                "--save": os.path.join(OUT, "tuned"),
            },
        )
    )
