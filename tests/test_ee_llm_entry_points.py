"""EE-LLM's entry points: each either runs here under its own name with its own flags, or the
README names it as not provided, with the reason. EE-LLM's server launch script
(examples/ee_inference/ee_inference_server.sh) calls tools/run_early_exit_text_generation_server.py
with --use-checkpoint-args --tokenizer-type --tokenizer-model --load --load-iteration --port."""

import os
import subprocess
import sys

from tests.conftest import ROOT

# EE-LLM's files that users launch (its examples/ and tools/ entry points), and the script each calls.
PROVIDED = {
    "tools/run_early_exit_text_generation_server.py": "examples/ee_inference/ee_inference_server.sh",
    "tools/run_text_generation_server.py": "Megatron-LM's server",
    "tools/text_generation_cli.py": "Megatron-LM's CLI",
    "tools/preprocess_data.py": "data preprocessing",
    "pretrain_early_exit_gpt.py": "examples/ee_training/*.sh, examples/ee_tuning/tune/*.sh",
    "tools/checkpoint/checkpoint_converter.py": "examples/ee_tuning/convert/add_exit_layers.sh",
}
NOT_PROVIDED = [
    "tools/request_client.py",
    "tools/checkpoint/util.py",
    "tools/convert_parallelism.sh",
    "tools/merge_datasets.py",
]
EE_LLM_SERVER_ARGS = [
    "--use-checkpoint-args",
    "--tokenizer-type",
    "SentencePieceTokenizer",
    "--tokenizer-model",
    "TOK",
    "--load",
    "CKPT",
    "--load-iteration",
    "0",
    "--port",
    "5000",
]


def test_every_ee_llm_entry_point_runs_or_is_listed_as_not_provided():
    for path in PROVIDED:
        assert os.path.isfile(os.path.join(ROOT, path)), path
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("## Coming from EE-LLM") :]
    section = section[: section.index("\n## ", 1)]
    for path in NOT_PROVIDED:
        name = path.split("/", 1)[1] if path.startswith("tools/") else path
        row = next((line for line in section.splitlines() if name in line), None)
        assert row is not None and ("not provided" in row or "not needed" in row), path
    assert "tools/run_early_exit_text_generation_server.py" in section


def test_ee_llm_server_script_name_takes_its_flags_and_is_the_server():
    from megatron.early_exit.server.launch import build_parser, parse_args

    args = parse_args(EE_LLM_SERVER_ARGS)
    assert (args.load, args.load_iteration, args.tokenizer_type, args.port) == (
        "CKPT",
        0,
        "SentencePieceTokenizer",
        5000,
    )
    # Its --help is the server's (options after the usage block, which wraps by program name).
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "run_early_exit_text_generation_server.py"), "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    options = proc.stdout.split("\n\n", 1)[1]
    assert options == build_parser().format_help().split("\n\n", 1)[1] and "--load-iteration" in options


def test_ee_llm_add_exit_flags_become_add_exits_flags():
    """add_exit_layers.sh's flags, as written, are add_exits.py's (which the converter runs)."""
    import importlib.util

    def load(name):
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", "checkpoint", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    converter, add_exits = load("checkpoint_converter"), load("add_exits")
    argv = converter.translate(
        [
            "--load-dir",
            "L",
            "--save-dir",
            "S",
            "--load-iteration",
            "1",
            "--use-exit-norm",
            "--use-exit-mlp",
            "--conversion-type",
            "add-exit",
            "--add-exit-layer-nums",
            "5",
            "10",
            "--megatron-path",
            "/m",
        ]
    )
    args = add_exits.parse_args(argv)
    assert (args.load, args.save, args.iteration, args.exit_layer_nums) == ("L", "S", 1, [5, 10])
    assert args.use_exit_norm and args.use_exit_mlp and not args.use_exit_block and not args.random_init
    random = add_exits.parse_args(
        converter.translate(
            ["--load-dir", "L", "--save-dir", "S", "--random-init", "--add-exit-layer-nums", "10", "--use-exit-block"]
        )
    )
    assert random.random_init and random.use_exit_block and random.init_method_std == 0.02
