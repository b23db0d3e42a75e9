"""The package itself is quiet (no PYTHONWARNINGS needed): the third-party deprecations a
user cannot act on, raised by the calls a checkpoint load and tensor-parallel training make,
are hidden once megatron.early_exit is imported; EE_SHOW_WARNINGS=1 shows them again."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = r"""
import os, sys, torch
import megatron.early_exit
from megatron.early_exit.parallel import initialize_parallel
from megatron.early_exit.training.arguments import build_run_config, parse_args
from megatron.early_exit.checkpoint.writer import save_weights
from megatron.early_exit.training.trainer import build_model
from megatron.early_exit.inference.loading import load_model

initialize_parallel(1, 1)
root = sys.argv[1]
args = parse_args("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 32 --micro-batch-size 1 "
                  "--train-iters 1 --lr 1e-3 --mock-data --tokenizer-type NullTokenizer --vocab-size 100 "
                  "--exit-layer-nums 1".split(), world_size=1)
save_weights(root, vars(args), build_model(build_run_config(args), torch.device("cpu"), 128), iteration=1)
load_model(root)
# What sequence parallelism at TP=2 calls (megatron-core's reduce-scatter and all-gather).
x = torch.ones(4)
out = torch.empty(4)
torch.distributed.reduce_scatter_tensor(out, x)
torch.distributed.all_gather_into_tensor(out, x)
print("done")
"""


def _run(tmp_path, **env):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "EE_SHOW_WARNINGS")} | env
    env.update(PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / env.get("EE_SHOW_WARNINGS", "0"))],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.slow  # two end-to-end subprocess runs (save, load, collectives); the import-time warnings are in make test
def test_checkpoint_load_and_collectives_print_no_warning(tmp_path):
    stderr = _run(tmp_path)
    assert "Warning" not in stderr, stderr[-3000:]
    shown = _run(tmp_path, EE_SHOW_WARNINGS="1")
    assert (
        "`load_state_dict` is deprecated" in shown
        and "`torch.distributed.reduce_scatter_tensor` is deprecated" in shown
    )
