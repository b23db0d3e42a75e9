"""The typed run configuration: built once after parsing, taken by the trainer; the argparse
namespace is written only by the argument modules and never reaches the trainer."""

import ast
import dataclasses
import os

import pytest

from tests.conftest import ROOT
from tests.training_fixtures import tiny_run_flags

PACKAGE = os.path.join(ROOT, "megatron", "early_exit")
# The only modules that may write to a parsed namespace: the parser and its checks.
ARGUMENT_MODULES = {
    os.path.join("training", "arguments.py"),
    os.path.join("training", "argument_checks.py"),
}
NAMESPACE_NAMES = {"args", "namespace", "flags_namespace"}


def _namespace_writes(path: str):
    """(line, what) of every write to a namespace-named variable in the file at `path`:
    `args.x = ...` (also augmented, annotated, in tuples), `del args.x`, `setattr(args, ...)`,
    `vars(args).update(...)` / `vars(args)[k] = ...`."""

    def is_namespace(node):
        return isinstance(node, ast.Name) and node.id in NAMESPACE_NAMES

    def is_vars_of_namespace(node):
        return (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "vars"
            and node.args
            and is_namespace(node.args[0])
        )

    def targets(node):
        if isinstance(node, (ast.Tuple, ast.List)):
            for element in node.elts:
                yield from targets(element)
        else:
            yield node

    for node in ast.walk(ast.parse(open(path).read(), path)):
        written = []
        if isinstance(node, ast.Assign):
            written = [t for target in node.targets for t in targets(target)]
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            written = [node.target]
        elif isinstance(node, ast.Delete):
            written = node.targets
        for target in written:
            if isinstance(target, ast.Attribute) and is_namespace(target.value):
                yield node.lineno, f"{target.value.id}.{target.attr}"
            if isinstance(target, ast.Subscript) and is_vars_of_namespace(target.value):
                yield node.lineno, "vars(...)[...]"
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id == "setattr" and node.args and is_namespace(node.args[0]):
                yield node.lineno, "setattr"
            if (
                isinstance(func, ast.Attribute)
                and func.attr in ("update", "setdefault", "pop", "__setitem__")
                and is_vars_of_namespace(func.value)
            ):
                yield node.lineno, f"vars(...).{func.attr}"


def _package_files():
    for directory, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                yield os.path.relpath(path, PACKAGE), path


def test_only_the_argument_modules_write_to_a_namespace():
    found = {rel: list(_namespace_writes(path)) for rel, path in _package_files()}
    outside = {rel: writes for rel, writes in found.items() if writes and rel not in ARGUMENT_MODULES}
    assert not outside, f"namespace writes outside {sorted(ARGUMENT_MODULES)}: {outside}"
    # The check sees the writes that are there (validation fills derived defaults).
    writes = found[os.path.join("training", "argument_checks.py")]
    assert any(what == "args.data_parallel_size" for _, what in writes)
    assert any(what == "args.num_microbatches" for _, what in writes)


def test_the_write_check_finds_every_kind_of_write(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        "def f(args, other):\n"
        "    args.a = 1\n"
        "    args.b += 1\n"
        "    x, args.c = 1, 2\n"
        "    setattr(args, 'd', 1)\n"
        "    vars(args).update(e=1)\n"
        "    vars(args)['f'] = 1\n"
        "    del args.g\n"
        "    other.h = 1\n"
        "    y = args.i\n"
    )
    assert [what for _, what in sorted(_namespace_writes(str(path)))] == [
        "args.a",
        "args.b",
        "args.c",
        "setattr",
        "vars(...).update",
        "vars(...)[...]",
        "args.g",
    ]


# Modules below the entry points: no function of theirs takes a parameter named like a namespace.
BELOW_ENTRY = [
    os.path.join("training", name)
    for name in (
        "trainer.py",
        "data.py",
        "logger.py",
        "run_control.py",
        "batch_schedule.py",
        "bubble_fill.py",
        "checkpointing.py",
        "pipeline_layout.py",
        "timers.py",
        "trackers.py",
        "run_config.py",
    )
]


def test_modules_below_the_entry_points_take_no_namespace():
    taking = {}
    for rel in BELOW_ENTRY:
        path = os.path.join(PACKAGE, rel)
        if not os.path.exists(path):
            continue
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                params = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                named = [p.arg for p in params if p.arg in NAMESPACE_NAMES]
                if named:
                    taking.setdefault(rel, []).append(f"{node.name}({', '.join(named)})")
    assert not taking, taking


def test_pretrain_takes_the_typed_configuration_and_refuses_a_namespace(corpus):
    from megatron.early_exit.training.arguments import parse_args
    from megatron.early_exit.training.trainer import pretrain

    args = parse_args(tiny_run_flags(corpus), world_size=1)
    with pytest.raises(TypeError, match=r"pretrain takes a RunConfig .*not argparse\.Namespace"):
        pretrain(args)


def test_the_entry_point_hands_pretrain_a_run_config(corpus, monkeypatch):
    import pretrain_early_exit_gpt
    from megatron.early_exit.training import trainer
    from megatron.early_exit.training.run_config import RunConfig

    received = []
    monkeypatch.setattr(trainer, "pretrain", received.append)
    monkeypatch.setenv("WORLD_SIZE", "1")
    pretrain_early_exit_gpt.main(tiny_run_flags(corpus, **{"--micro-batch-size": 2, "--global-batch-size": 8}))
    (config,) = received
    assert isinstance(config, RunConfig)
    assert (config.training.micro_batch_size, config.training.global_batch_size, config.num_microbatches) == (2, 8, 4)


def test_run_config_holds_the_validated_flags_and_derives_once(corpus):
    from megatron.early_exit.training.arguments import build_run_config, parse_args

    argv = tiny_run_flags(
        corpus,
        **{
            "--micro-batch-size": 2,
            "--global-batch-size": 16,
            "--tensor-model-parallel-size": 2,
            "--pipeline-model-parallel-size": 2,
            "--num-layers": 4,
            "--exit-layer-nums": "1 3",
            "--sequence-parallel": None,
            "--save": "/nonexistent/save",
        },
    )
    args = parse_args(argv, world_size=8)
    config = build_run_config(args)
    # The flags a checkpoint stores as its "args" are the namespace's, key for key in order.
    assert list(config.flags.items()) == list(vars(args).items())
    assert config.parallel.data_parallel_size == args.data_parallel_size == 2
    assert config.num_microbatches == args.num_microbatches == 4
    assert config.training.lr_decay_iters == args.lr_decay_iters == args.train_iters
    assert config.built_stages == (4, 2) and config.virtual_pipeline_chunks == 1
    assert config.parallel.sequence_parallel and config.checkpoint.save == "/nonexistent/save"
    assert config.early_exit.exit_layer_nums == [1, 3] and config.model.num_layers == 4
    assert config.model.ffn_hidden_size == args.ffn_hidden_size
    assert config.data.seq_length == args.seq_length and config.data.data_path == tuple(args.data_path)
    assert config.training.scheduler_steps.decay == args.train_iters
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.training.lr = 1.0
    with pytest.raises(TypeError):
        config.flags["lr"] = 1.0


def test_one_ffn_default_for_flags_and_model_description(corpus):
    from megatron.early_exit.models.model_config import ModelConfig, default_ffn_hidden_size
    from megatron.early_exit.training import argument_checks
    from megatron.early_exit.training.arguments import parse_args

    assert argument_checks.default_ffn_hidden_size is default_ffn_hidden_size
    for swiglu, expected in ((False, 384), (True, 256)):  # 4 x 96; SwiGLU: 2/3 of it, a multiple of 64
        flags = {"--hidden-size": 96, "--num-attention-heads": 4, "--swiglu": None if swiglu else False}
        parsed = parse_args(tiny_run_flags(corpus, **flags), world_size=1).ffn_hidden_size
        described = ModelConfig(
            num_layers=2,
            hidden_size=96,
            num_attention_heads=4,
            padded_vocab_size=64,
            max_position_embeddings=32,
            swiglu=swiglu,
        ).ffn_hidden_size
        assert parsed == described == default_ffn_hidden_size(96, swiglu) == expected
