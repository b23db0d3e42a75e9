"""The model description: stored with every checkpoint, read back without the training
code, older checkpoints still load, and a moved checkpoint finds its tokenizer."""

import os
import shutil
import subprocess
import sys

import torch

from tests.conftest import ROOT
from tests.training_fixtures import tiny_run_flags

OLD_CHECKPOINT = os.path.join(ROOT, "tests", "data", "checkpoint_v2")  # written before model descriptions were stored


def test_inference_server_and_converters_import_no_training_code():
    code = (
        "import sys\n"
        "import megatron.early_exit.inference, megatron.early_exit.server, megatron.early_exit.hf\n"
        "import megatron.early_exit.inference.loading, megatron.early_exit.hf.convert, "
        "megatron.early_exit.hf.add_exits, megatron.early_exit.legacy.convert\n"
        "import megatron.early_exit.server.launch\n"
        "bad = sorted(m for m in sys.modules if m.startswith('megatron.early_exit.training'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_description_round_trips_and_builds_what_the_flags_build(dist1):
    from megatron.early_exit.models.model_config import ModelConfig
    from megatron.early_exit.sharding import full_state_dict
    from megatron.early_exit.training.arguments import build_run_config, parse_args
    from megatron.early_exit.training.trainer import build_model

    args = parse_args(
        tiny_run_flags(
            None,
            **{
                "--mock-data": None,
                "--tokenizer-type": False,
                "--use-exit-mlp": None,
                "--group-query-attention": None,
                "--num-query-groups": 2,
            },
        ),
        world_size=1,
    )
    config = build_run_config(args).model_config(64)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert ModelConfig.from_flags({**vars(args), **config.to_flags()}, 64) == config
    assert config.exit_layer_nums == [1, 2] and config.num_query_groups == 2 and config.early_exit.use_exit_mlp
    from megatron.early_exit.models.builder import build_model as build_from_description

    a, b = (
        full_state_dict(build_model(build_run_config(args), torch.device("cpu"), 64)),
        full_state_dict(build_from_description(config, torch.device("cpu"), seed=args.seed)),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_differences_are_listed_by_flag(dist1):
    import dataclasses

    from megatron.early_exit.config import EarlyExitConfig
    from megatron.early_exit.models.model_config import ModelConfig

    base = ModelConfig(
        num_layers=4,
        hidden_size=32,
        num_attention_heads=4,
        padded_vocab_size=64,
        max_position_embeddings=32,
        early_exit=EarlyExitConfig(exit_layer_nums=[2], use_exit_norm=True),
    )
    other = dataclasses.replace(
        base,
        hidden_size=64,
        padded_vocab_size=128,
        hidden_dropout=0.0,
        early_exit=EarlyExitConfig(exit_layer_nums=[2], use_exit_mlp=True),
    )
    assert base.architecture_differences(other) == [
        "--hidden-size: checkpoint 32, now 64",
        "--padded-vocab-size: checkpoint 64, now 128",
        "--use-exit-norm: checkpoint True, now False",
        "--use-exit-mlp: checkpoint False, now True",
    ]


def test_checkpoint_of_the_previous_format_loads_with_the_same_logits(dist1):
    from megatron.early_exit.checkpoint.reader import read_common, resolve
    from megatron.early_exit.inference.loading import load_model

    assert "model_config" not in read_common(resolve(OLD_CHECKPOINT))  # the old format indeed
    expected = torch.load(os.path.join(OLD_CHECKPOINT, "expected_logits.pt"))
    model, tokenizer, config = load_model(OLD_CHECKPOINT)
    assert (config.num_layers, config.exit_layer_nums, config.padded_vocab_size, tokenizer.vocab_size) == (
        2,
        [1],
        64,
        60,
    )
    tokens = expected["tokens"]
    with torch.no_grad():
        out = model(tokens, torch.arange(tokens.shape[1]).unsqueeze(0), None)
        assert torch.allclose(out.final, expected["final"], atol=1e-6)
        assert torch.allclose(out.exits[0].compute_logits(), expected["exit_1"], atol=1e-6)


def _sentencepiece_checkpoint(root: str) -> None:
    """A checkpoint whose SentencePiece model lies inside its own directory."""
    from megatron.early_exit.checkpoint.writer import save_weights
    from megatron.early_exit.tokenizers import train_sentencepiece
    from megatron.early_exit.training.arguments import build_run_config, parse_args
    from megatron.early_exit.training.trainer import build_model

    os.makedirs(os.path.join(root, "tokenizer"))
    text = os.path.join(root, "corpus.txt")
    with open(text, "w") as f:
        f.write("\n".join(f"the model number {i} exits early at layer {i % 4} of the stack" for i in range(300)))
    model_file = train_sentencepiece(
        text, os.path.join(root, "tokenizer", "sp"), vocab_size=320
    )  # = padded: no padding ids
    os.remove(text)
    args = parse_args(
        tiny_run_flags(
            None,
            **{
                "--mock-data": None,
                "--tokenizer-type": "SentencePieceTokenizer",
                "--tokenizer-model": model_file,
                "--vocab-size": False,
                "--seq-length": 64,
            },
        ),
        world_size=1,
    )
    save_weights(root, vars(args), build_model(build_run_config(args), torch.device("cpu"), 320), iteration=1)


def test_moved_checkpoint_loads_and_serves_with_no_extra_flags(dist1, tmp_path):
    import httpx

    from megatron.early_exit.checkpoint.reader import read_common, resolve
    from megatron.early_exit.inference import FullDepth, generate
    from megatron.early_exit.inference.loading import load_model
    from tests.server_fixtures import Server

    first = str(tmp_path / "written_here")
    _sentencepiece_checkpoint(first)
    assert read_common(resolve(first))["model_config"]["tokenizer"]["model"] == os.path.join("tokenizer", "sp.model")
    moved = str(tmp_path / "elsewhere" / "ckpt")
    shutil.copytree(first, moved)
    shutil.rmtree(first)
    model, tokenizer, _ = load_model(moved)
    srv = Server(moved, str(tmp_path / "server.log"))
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as client:
            reply = client.put(
                "/api", json={"prompts": ["the model number 7"], "tokens_to_generate": 6, "temperature": 0}
            )
            assert reply.status_code == 200, reply.text
            tokens = reply.json()["tokens"][0]
    finally:
        srv.stop()
    prompt = tokens[:-6]
    assert tokenizer.detokenize(prompt).strip() == "the model number 7"
    assert tokens[-6:] == generate(model, [prompt], FullDepth(), 6, stop_tokens=(tokenizer.eod,)).tokens[0]


def test_use_checkpoint_args_finds_the_tokenizer_of_a_moved_checkpoint(dist1, tmp_path):
    from megatron.early_exit.training.arguments import parse_args

    first = str(tmp_path / "written_here")
    _sentencepiece_checkpoint(first)
    moved = str(tmp_path / "moved")
    shutil.move(first, moved)
    args = parse_args(
        [
            "--load",
            moved,
            "--use-checkpoint-args",
            "--micro-batch-size",
            "1",
            "--train-iters",
            "1",
            "--lr",
            "1e-3",
            "--mock-data",
            "--finetune",
        ],
        world_size=1,
    )
    assert args.tokenizer_model == os.path.join(moved, "tokenizer", "sp.model") and os.path.isfile(args.tokenizer_model)


def test_tokenizer_paths_are_stored_relative_only_inside_the_checkpoint(tmp_path, monkeypatch):
    from megatron.early_exit.models.model_config import TokenizerConfig

    monkeypatch.chdir(tmp_path)
    root = str(tmp_path / "run" / "checkpoints")
    stored = TokenizerConfig("SentencePieceTokenizer", "run/tokenizer.model").relative_to(root)  # cwd-relative, outside
    assert stored.model == str(tmp_path / "run" / "tokenizer.model")
    inside = TokenizerConfig("SentencePieceTokenizer", "run/checkpoints/tok/sp.model").relative_to(root)
    assert inside.model == os.path.join("tok", "sp.model") and inside.resolved("/moved").model == "/moved/tok/sp.model"
