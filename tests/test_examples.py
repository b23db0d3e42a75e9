"""The launch scripts in examples/ee_llm cannot rot: their flags pass argument validation."""

import glob
import os
import subprocess

import pytest

from tests.conftest import ROOT

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "examples", "ee_llm", "pretrain_early_exit_*.sh")))
EE_LLM_SHAPES = {  # (layers, hidden, heads, TP, PP, exits)
    "1.3B": (24, 2048, 32, 1, 4, [7, 13]),
    "7B": (32, 4096, 32, 1, 4, [9, 17]),
    "13B": (40, 5120, 40, 2, 4, [11, 21]),
    "30B": (60, 6656, 52, 4, 4, [16, 31]),
}


def test_every_size_has_a_script():
    names = {os.path.basename(s)[len("pretrain_early_exit_") : -3] for s in SCRIPTS}
    assert names == set(EE_LLM_SHAPES)


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_arguments_validate(script, tmp_path):
    from megatron.early_exit.training.arguments import parse_args

    prefix = str(tmp_path / "corpus_text_document")
    for suffix in (".bin", ".idx"):
        open(prefix + suffix, "w").close()
    env = dict(os.environ, EE_PRINT_ARGS="1", DATA_PATH=prefix, TOKENIZER_MODEL=str(tmp_path / "tok.model"))
    out = subprocess.run(["bash", script], capture_output=True, text=True, env=env, check=True).stdout.splitlines()
    world_size = int(out[0].split("=")[1])
    args = parse_args(out[1:], world_size=world_size)
    layers, hidden, heads, tp, pp, exits = EE_LLM_SHAPES[os.path.basename(script)[len("pretrain_early_exit_") : -3]]
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (layers, hidden, heads)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (tp, pp)
    assert args.exit_layer_nums == exits and args.pre_exit and args.bf16
    assert args.sequence_parallel == (tp > 1)  # nothing to split at TP=1
    assert args.data_parallel_size >= 1 and args.num_microbatches >= 1
