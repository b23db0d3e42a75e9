"""Inputs a run must refuse in one line, or survive: a corpus too small for --split, exit
weights and training values argparse lets through, a corpus line that is not text, a
preprocessing run killed midway, dataset files that are garbage or cut short, and a dataset
cache that cannot be written.
"""

import math
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tests.helpers import wait_until
from tests.tokenizer_fixtures import documents, run_preprocess_cli, write_jsonl
from tests.training_fixtures import run_training, tiny_run_flags, write_corpus

PRETRAIN = os.path.join(ROOT, "pretrain_early_exit_gpt.py")
ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def pretrain_cli(argv, timeout=300):
    return subprocess.run(
        [sys.executable, PRETRAIN, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def last_line(text: str) -> str:
    """The last line of stderr, without the `[rank0]: ` torch.distributed puts before errors
    raised once its process group exists."""
    return re.sub(r"^\[rank\d+\]: ", "", text.strip().splitlines()[-1])


# -- a corpus too small for --split (megatron-core looped forever on an empty split) ---------------


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("small")), num_docs=200)


def test_small_corpus_with_the_default_split_trains(dist1, small_corpus, capsys):
    """200 documents and --split 969,30,1: the test split gets none. Pretraining never reads it,
    so the run trains, with --eval-iters 0 and with validation (which gets 6 documents). In this
    process: the command line's own errors are tested below."""
    for eval_iters in (0, 1):
        flags = tiny_run_flags(
            small_corpus,
            iters=4,
            **{"--split": False, "--eval-iters": eval_iters, "--eval-interval": 4, "--log-interval": 1},
        )
        run_training(flags)
        out = capsys.readouterr().out
        assert "iteration        4/       4" in out
        assert ("validation loss at iteration 4" in out) == (eval_iters > 0), out


def test_a_used_split_without_documents_fails_at_once(dist1, small_corpus):
    from megatron.early_exit.errors import ConfigError

    proc = pretrain_cli(tiny_run_flags(small_corpus, iters=4, **{"--split": "999,1,0", "--eval-iters": 1}), timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert last_line(proc.stderr) == (
        f"error: --split 999,1,0: the validation split of {small_corpus} gets no documents (train 200, validation 0, "
        "test 0 of 200); give it a larger share or --eval-iters 0"
    )
    assert "iteration" not in proc.stdout, proc.stdout[-3000:]  # it stopped before training
    with pytest.raises(ConfigError, match="^--split 0,1,0: the train split of"):  # in this process: the same check
        run_training(tiny_run_flags(small_corpus, iters=4, **{"--split": "0,1,0", "--eval-iters": 1}))


# -- exit weights and training values ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(exit_layer_weight=[-1.0, 0.5]), r"--exit-layer-weight must be finite and >= 0, got -1.0"),
        (dict(exit_layer_weight=[float("nan"), 0.5]), r"--exit-layer-weight must be finite and >= 0, got nan"),
        (dict(exit_layer_weight=[0.5, float("inf")]), r"--exit-layer-weight must be finite and >= 0, got inf"),
        (dict(exit_layer_weight_init=[-0.1, 0.0]), r"--exit-layer-weight-init must be finite and >= 0, got -0.1"),
        (dict(exit_layer_temperature=[float("nan"), 1.0]), r"--exit-layer-temperature must be > 0 and finite, got nan"),
        (dict(exit_layer_temperature=[float("inf"), 1.0]), r"--exit-layer-temperature must be > 0 and finite, got inf"),
    ],
)
def test_exit_weights_must_be_finite_and_non_negative(kwargs, message):
    from megatron.early_exit.config import EarlyExitConfig
    from megatron.early_exit.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        EarlyExitConfig(exit_layer_nums=[1, 2], **kwargs)
    assert EarlyExitConfig(exit_layer_nums=[1, 2], exit_layer_weight=[0.0, 1.0]).exit_weights(0) == [0.0, 1.0]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"--exit-layer-weight": "-1 0.5"}, r"--exit-layer-weight must be finite and >= 0, got -1.0"),
        ({"--exit-layer-weight": "nan 0.5"}, r"--exit-layer-weight must be finite and >= 0, got nan"),
        ({"--log-interval": 0}, r"--log-interval must be >= 1, got 0"),
        ({"--eval-interval": 0}, r"--eval-interval must be >= 1, got 0"),
        ({"--lr": "nan"}, r"--lr must be finite and >= 0, got nan"),
        ({"--lr": "inf"}, r"--lr must be finite and >= 0, got inf"),
        ({"--lr": "-0.001", "--min-lr": 0}, r"--lr must be finite and >= 0, got -0.001"),
        ({"--min-lr": "nan"}, r"--min-lr must be finite and >= 0, got nan"),
        ({"--min-lr": "-1"}, r"--min-lr must be finite and >= 0, got -1.0"),
        ({"--hidden-dropout": 1.5}, r"--hidden-dropout must be in \[0, 1\), got 1.5"),
        ({"--hidden-dropout": "nan"}, r"--hidden-dropout must be in \[0, 1\), got nan"),
        ({"--attention-dropout": 1.0}, r"--attention-dropout must be in \[0, 1\), got 1.0"),
        ({"--attention-dropout": -0.1}, r"--attention-dropout must be in \[0, 1\), got -0.1"),
        ({"--weight-decay": "nan"}, r"--weight-decay must be finite and >= 0, got nan"),
        ({"--clip-grad": "nan"}, r"--clip-grad must be finite and >= 0, got nan"),
        ({"--adam-eps": "nan"}, r"--adam-eps must be finite and > 0, got nan"),
        ({"--adam-beta1": 1.5}, r"--adam-beta1 must be in \[0, 1\), got 1.5"),
        ({"--adam-beta2": "nan"}, r"--adam-beta2 must be in \[0, 1\), got nan"),
        ({"--init-method-std": "nan"}, r"--init-method-std must be finite and > 0, got nan"),
        ({"--init-method-std": "-1"}, r"--init-method-std must be finite and > 0, got -1.0"),
        ({"--split": "0,0,0"}, r"--split 0,0,0: give up to three comma-separated weights >= 0"),
        ({"--split": "90,x,0"}, r"--split 90,x,0: give up to three"),
    ],
)
def test_training_values_are_refused_naming_the_flag(overrides, message):
    from megatron.early_exit.errors import ConfigError
    from megatron.early_exit.training.arguments import parse_args

    with pytest.raises(ConfigError, match=message):
        parse_args(tiny_run_flags(None, **{"--mock-data": None, "--tokenizer-type": False, **overrides}), world_size=1)


def test_bad_training_value_is_one_line_on_the_command_line():
    proc = pretrain_cli(tiny_run_flags(None, **{"--mock-data": None, "--tokenizer-type": False, "--lr": "nan"}))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert last_line(proc.stderr) == "error: --lr must be finite and >= 0, got nan"


# -- preprocess_data.py ------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", ["1", "2"])
def test_preprocess_lone_surrogate_names_the_line(tmp_path, sp_model, workers):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "the quick fox"}, '{"text": "fox \\ud800 dog"}'])
    proc = run_preprocess_cli(
        "--input",
        corpus,
        "--output-prefix",
        str(tmp_path / "c"),
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        sp_model,
        "--workers",
        workers,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert last_line(proc.stderr) == (
        f"error: --input {corpus}, line 2: 'text': not valid Unicode (surrogates not allowed: '\\ud800' at character 4)"
    )
    assert sorted(os.listdir(tmp_path)) == ["corpus.jsonl"]


def _null_corpus(path, num_docs: int, first: int = 1) -> str:
    return write_jsonl(
        path, [{"text": " ".join(str((first + i + j) % 60) for j in range(40))} for i in range(num_docs)]
    )


def _preprocess(corpus, prefix):
    return [
        sys.executable,
        os.path.join(ROOT, "tools", "preprocess_data.py"),
        "--input",
        corpus,
        "--output-prefix",
        prefix,
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        "64",
        "--workers",
        "1",
    ]


def _temporary_files(directory):
    return sorted(name for name in os.listdir(directory) if ".tmp" in name)


def _start_and_stop_midway(corpus, prefix, sig):
    """Start a preprocessing run and send `sig` once its temporary output exists."""
    proc = subprocess.Popen(
        _preprocess(corpus, prefix), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    directory = os.path.dirname(prefix)
    wait_until(lambda: _temporary_files(directory) or proc.poll() is not None, timeout=120, interval=0.005)
    assert proc.poll() is None and _temporary_files(directory), "the run ended (or wrote nothing) before it was stopped"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


@pytest.mark.slow
def test_preprocess_interrupted_keeps_the_previous_output_and_cleans_up(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    prefix = str(out / "corpus")
    final = prefix + "_text_document"
    small = _null_corpus(tmp_path / "small.jsonl", 50)
    big = _null_corpus(tmp_path / "big.jsonl", 200_000, first=7)
    subprocess.run(_preprocess(small, prefix), cwd=ROOT, env=ENV, check=True, capture_output=True)
    published = {s: open(final + s, "rb").read() for s in (".bin", ".idx")}

    code, err = _start_and_stop_midway(big, prefix, signal.SIGTERM)  # a plain `kill`
    assert code == 130 and last_line(err) == "interrupted; no output written", err
    assert _temporary_files(out) == []
    assert {s: open(final + s, "rb").read() for s in (".bin", ".idx")} == published

    code, _ = _start_and_stop_midway(big, prefix, signal.SIGKILL)  # nothing can clean up after this
    assert code == -signal.SIGKILL
    left = _temporary_files(out)
    assert left and {s: open(final + s, "rb").read() for s in (".bin", ".idx")} == published

    proc = subprocess.run(_preprocess(small, prefix), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert _temporary_files(out) == []
    assert all(f"removed {out / name}, left by an interrupted run" in proc.stderr for name in left)


def test_preprocess_removes_only_leftovers_of_dead_runs_on_its_prefix(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    prefix = str(tmp_path / "corpus")
    mine = [f"corpus_text_document.tmp{dead.pid}.bin", f"corpus_text_document.tmp{dead.pid}.idx"]
    kept = [
        f"corpus_text_document.tmp{os.getpid()}.bin",  # a live run
        f"other_text_document.tmp{dead.pid}.bin",  # another prefix
        f"corpus_title_document.tmp{dead.pid}.bin",  # a key this run does not write
        "corpus_text_document.tmpx.bin",
        "notes.txt",
    ]
    for name in mine + kept:
        (tmp_path / name).write_bytes(b"partial")
    corpus = _null_corpus(tmp_path / "corpus.jsonl", 20)
    proc = subprocess.run(_preprocess(corpus, prefix), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    names = set(os.listdir(tmp_path))
    assert not names & set(mine) and set(kept) <= names
    assert proc.stderr.count("left by an interrupted run") == 2


def test_preprocess_interrupted_while_publishing_never_pairs_old_and_new_files(
    preprocess_tool, capsys, tmp_path, monkeypatch
):
    """Killed between renaming the new .bin and the new .idx: the old .idx must not stay beside
    the new .bin (training would read the new tokens with the old offsets)."""
    prefix = str(tmp_path / "corpus")
    final = prefix + "_text_document"
    assert preprocess_tool.main(_preprocess(_null_corpus(tmp_path / "a.jsonl", 30), prefix)[2:]) == 0
    real_replace = os.replace

    def interrupted(src, dst):
        if dst == final + ".idx":
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(preprocess_tool.os, "replace", interrupted)
    assert preprocess_tool.main(_preprocess(_null_corpus(tmp_path / "b.jsonl", 70, first=3), prefix)[2:]) == 130
    monkeypatch.undo()
    assert not os.path.exists(final + ".idx")  # the prefix is absent, not mixed
    assert _temporary_files(tmp_path) == []
    assert preprocess_tool.main(_preprocess(str(tmp_path / "b.jsonl"), prefix)[2:]) == 0
    capsys.readouterr()
    assert len(documents(final)) == 70


# -- dataset files given to training -----------------------------------------------------------------


def _damaged_copy(corpus, directory, damage):
    prefix = os.path.join(str(directory), "damaged_text_document")
    for suffix in (".bin", ".idx"):
        shutil.copyfile(corpus + suffix, prefix + suffix)
    damage(prefix)
    return prefix


def _cut(path, keep):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: keep(len(data))])


DAMAGE = {
    "garbage idx": (lambda p: open(p + ".idx", "wb").write(os.urandom(4096)), r"\.idx is not a Megatron \.idx file"),
    "idx cut in half": (lambda p: _cut(p + ".idx", lambda n: n // 2), r"\.idx is truncated"),
    "idx cut to its header": (lambda p: _cut(p + ".idx", lambda n: 20), r"\.idx is not a Megatron \.idx file"),
    "bin cut in half": (lambda p: _cut(p + ".bin", lambda n: n // 2), r"\.bin is truncated or does not match"),
    "empty bin": (lambda p: _cut(p + ".bin", lambda n: 0), r"\.bin is truncated or does not match"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_dataset_files_are_named(dist1, corpus, tmp_path, case):
    from megatron.early_exit.errors import ConfigError
    from megatron.early_exit.tokenizers import build_tokenizer
    from megatron.early_exit.training.arguments import build_run_config, parse_args
    from megatron.early_exit.training.data import build_datasets

    damage, message = DAMAGE[case]
    prefix = _damaged_copy(corpus, tmp_path, damage)
    args = parse_args(tiny_run_flags(prefix, iters=4), world_size=1)
    with pytest.raises(ConfigError, match=r"^--data-path: " + re.escape(str(tmp_path)) + ".*" + message):
        build_datasets(build_run_config(args), build_tokenizer("NullTokenizer", vocab_size=args.vocab_size))


def test_damaged_dataset_is_one_line_on_the_command_line(corpus, tmp_path):
    prefix = _damaged_copy(corpus, tmp_path, DAMAGE["bin cut in half"][0])
    proc = pretrain_cli(tiny_run_flags(prefix, iters=4))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert last_line(proc.stderr).startswith(f"error: --data-path: {prefix}.bin is truncated or does not match")


def _unwritable_directory(tmp_path) -> str:
    """A directory this process cannot create files in (root ignores permission bits, so
    for root a path under sysfs, which refuses new entries)."""
    if os.geteuid() != 0:
        path = tmp_path / "read_only"
        path.mkdir()
        path.chmod(0o555)
        return str(path)
    path = "/sys/early_exit_cache_test"
    try:
        os.mkdir(path)
    except OSError:
        return path
    os.rmdir(path)
    pytest.skip("no unwritable location for root here")


def test_unwritable_data_cache_path_names_the_flag(dist1, corpus, tmp_path):
    from megatron.early_exit.errors import ConfigError
    from megatron.early_exit.tokenizers import build_tokenizer
    from megatron.early_exit.training.arguments import build_run_config, parse_args
    from megatron.early_exit.training.data import build_datasets

    cache = _unwritable_directory(tmp_path)
    args = parse_args(tiny_run_flags(corpus, iters=4, **{"--data-cache-path": cache}), world_size=1)
    tokenizer = build_tokenizer("NullTokenizer", vocab_size=args.vocab_size)
    with pytest.raises(ConfigError, match=rf"^--data-cache-path {cache}: cannot write the dataset index cache"):
        build_datasets(build_run_config(args), tokenizer)
    args = parse_args(tiny_run_flags(corpus, iters=4, **{"--data-cache-path": str(tmp_path / "cache")}), world_size=1)
    train, valid, test = build_datasets(build_run_config(args), tokenizer)  # a writable one works, and caches
    assert len(train) >= 16 and len(valid) > 0 and test is None and os.listdir(tmp_path / "cache")
    assert not math.isnan(float(train[0]["tokens"].float().mean()))


# -- checks that run whatever splits a run reads --------------------------------------------------


def _build(args, prefix_vocab=None):
    """build_datasets with a 60 s alarm: a split megatron-core loops on fails instead of hanging."""
    from megatron.early_exit.tokenizers import build_tokenizer
    from megatron.early_exit.training.arguments import build_run_config
    from megatron.early_exit.training.data import build_datasets

    def hung(signum, frame):
        raise AssertionError("build_datasets hung (looping on a split without documents)")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        return build_datasets(
            build_run_config(args), build_tokenizer("NullTokenizer", vocab_size=prefix_vocab or args.vocab_size)
        )
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_dataset_checks_run_with_eval_iters_0(dist1, small_corpus, tmp_path):
    """--eval-iters 0 used to skip every check: an empty train split hung, a damaged file gave
    megatron-core's traceback."""
    from megatron.early_exit.errors import ConfigError
    from megatron.early_exit.training.arguments import parse_args

    args = parse_args(tiny_run_flags(small_corpus, iters=4, **{"--split": "0,100,0", "--eval-iters": 0}), world_size=1)
    with pytest.raises(ConfigError, match=r"^--split 0,100,0: the train split of .* gets no documents"):
        _build(args)
    prefix = _damaged_copy(small_corpus, tmp_path, DAMAGE["bin cut in half"][0])
    args = parse_args(tiny_run_flags(prefix, iters=4, **{"--eval-iters": 0}), world_size=1)
    with pytest.raises(ConfigError, match=r"^--data-path: .*\.bin is truncated or does not match"):
        _build(args)


def test_corpus_of_a_larger_vocabulary_is_named(dist1, tmp_path):
    """Token ids beyond the tokenizer's vocabulary failed in the embedding (IndexError)."""
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron.early_exit.errors import ConfigError
    from megatron.early_exit.training.arguments import parse_args

    prefix = str(tmp_path / "wide_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
    rng = numpy.random.default_rng(0)
    for _ in range(200):
        builder.add_document(torch.tensor(rng.integers(0, 500, 60)), [60])
    builder.finalize(prefix + ".idx")
    args = parse_args(tiny_run_flags(prefix, iters=4, **{"--eval-iters": 0}), world_size=1)
    with pytest.raises(
        ConfigError,
        match=r"^--data-path: .*wide_text_document\.bin document 0 holds token id 4\d\d, "
        r"outside the tokenizer's vocabulary of 64",
    ):
        _build(args)
    train, _, _ = _build(
        parse_args(tiny_run_flags(prefix, iters=4, **{"--eval-iters": 0, "--vocab-size": 500}), world_size=1), 500
    )
    assert int(train[0]["tokens"].max()) < 500
