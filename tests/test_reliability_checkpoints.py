"""Checkpoints that cannot run code, are checked for damage, have one writer, hold only
finite values, and fail with one line naming the flag or file (docs/security.md)."""

import errno
import functools
import glob
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
import zlib

import pytest
import torch

from tests.conftest import ROOT
from tests.helpers import wait_until
from tests.training_fixtures import VOCAB, run_training, tiny_run_flags

QUIET = {"--eval-iters": 0}


def _fresh_process_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return dict(env, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **extra)


def _inspect(path):
    script = os.path.join(ROOT, "tools", "checkpoint", "inspect.py")
    return subprocess.run(
        [sys.executable, script, path], capture_output=True, text=True, timeout=600, env=_fresh_process_env()
    )


@pytest.fixture(scope="module")
def saved(dist1, corpus, tmp_path_factory):
    """A full checkpoint (weights, Adam, scheduler, RNG) of 2 iterations."""
    root = str(tmp_path_factory.mktemp("saved"))
    run_training(tiny_run_flags(corpus, iters=2, **QUIET, **{"--save": root, "--lr-warmup-iters": 1}))
    return root


def _copy(saved, tmp_path, name="copy"):
    root = str(tmp_path / name)
    shutil.copytree(saved, root)
    return root, os.path.join(root, "iter_0000002")


def _reseal(path):
    """Rewrite the checksums after planting a file, as whoever planted it could."""
    manifest = os.path.join(path, "checksums.json")
    if not os.path.isfile(manifest):
        return
    files = {
        n: [os.path.getsize(os.path.join(path, n)), f"{zlib.crc32(open(os.path.join(path, n), 'rb').read()):08x}"]
        for n in os.listdir(path)
        if n != "checksums.json"
    }
    json.dump({"format": "crc32", "files": files}, open(manifest, "w"))


# ----------------------------------------------------------------------------- no code runs on load


class RunsCode:
    """What a planted pickle does: unpickling it calls a function (here one creating `marker`)."""

    def __init__(self, marker, how="system"):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "eval":
            return eval, (f"open({self.marker!r}, 'w').close()",)
        return os.system, (f"touch {self.marker}",)


REFUSED = {
    "system": r"refuses to load (posix|os|nt)\.system \(a checkpoint never holds it; it could run code\)",
    "eval": r"refuses to load builtins\.eval \(a checkpoint never holds it; it could run code\)",
}


def _plant_index(path, marker):
    index = pickle.load(open(os.path.join(path, ".metadata"), "rb"))  # our own file: trusted here
    index.planner_data = {"planted": RunsCode(marker)}
    pickle.dump(index, open(os.path.join(path, ".metadata"), "wb"))


def _plant_common(path, marker):
    common = torch.load(os.path.join(path, "common.pt"), weights_only=False)
    common["args"]["planted"] = RunsCode(marker, "eval")
    torch.save(common, os.path.join(path, "common.pt"))


def _weights_checkpoint_with(root, corpus, key_suffix, payload):
    """A weights-only checkpoint whose byte item `*key_suffix` holds `payload`."""
    from megatron.early_exit.checkpoint.writer import publish, weights_state
    from megatron.early_exit.training.arguments import build_run_config, parse_args
    from megatron.early_exit.training.trainer import build_model

    args = parse_args(tiny_run_flags(corpus, iters=4), world_size=1)
    model = build_model(build_run_config(args), torch.device("cpu"), VOCAB)
    state = weights_state(vars(args), model, 0, 0, root, has_optimizer=False)
    key = next(k for k in state["model"] if k.endswith(key_suffix))
    state["model"][key].data = payload
    publish(root, 0, lambda: state)
    return os.path.join(root, "iter_0000000")


def _load_paths(root, corpus, tmp_path, monkeypatch):
    """Every way this project reads a checkpoint, each a callable."""
    from megatron.early_exit.hf.add_exits import add_exits
    from megatron.early_exit.hf.convert import export_llama
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.server import launch

    monkeypatch.setattr(launch, "serve", lambda *a, **k: pytest.fail("the server started on a planted checkpoint"))
    return {
        "pretrain --load": lambda: run_training(
            tiny_run_flags(corpus, iters=4, **QUIET, **{"--load": root, "--finetune": None})
        ),
        "load_model": lambda: load_model(root),
        "server": lambda: launch.main(["--load", root]),
        "export_llama": lambda: export_llama(root, str(tmp_path / "hf"), progress=False),
        "add_exits": lambda: add_exits(root, str(tmp_path / "ee"), exits={"exit_layer_nums": [1, 2, 3]}),
    }


def _refused_everywhere(root, corpus, tmp_path, monkeypatch, pattern, marker, inspect_reads_it=True):
    from megatron.early_exit.errors import EarlyExitError

    for name, load in _load_paths(root, corpus, tmp_path, monkeypatch).items():
        with pytest.raises(EarlyExitError) as err:
            load()
        assert len(str(err.value).splitlines()) == 1, (name, str(err.value))
        assert re.search(pattern, str(err.value)), (name, str(err.value))
    done = _inspect(root)
    if inspect_reads_it:
        assert done.returncode == 1 and "refuses to load" in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]
    assert not marker.exists(), "code in the checkpoint ran"


@pytest.mark.parametrize("part", ["index", "common"])
def test_planted_pickle_in_index_or_common_is_refused_by_name_everywhere(saved, corpus, tmp_path, monkeypatch, part):
    # torch.load calls that leave weights_only to its default would now unpickle anything.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    root, path = _copy(saved, tmp_path)
    marker = tmp_path / "code_ran"
    (_plant_index if part == "index" else _plant_common)(path, marker)
    _reseal(path)
    file = os.path.join(path, ".metadata" if part == "index" else "common.pt")
    pattern = f"checkpoint file {file}: " + REFUSED["system" if part == "index" else "eval"]
    _refused_everywhere(root, corpus, tmp_path, monkeypatch, pattern, marker)


@pytest.mark.parametrize("form", ["object", "transformer_engine_bytes"])
def test_planted_extra_state_is_refused_before_any_module_reads_it(dist1, corpus, tmp_path, monkeypatch, form):
    """A byte item (torch DCP reads it with torch.load(weights_only=False)), and the bytes
    Transformer Engine's set_extra_state unpickles with plain pickle."""
    marker = tmp_path / "code_ran"
    payload = RunsCode(marker)
    if form == "transformer_engine_bytes":
        payload = torch.frombuffer(bytearray(pickle.dumps(payload)), dtype=torch.uint8)
    root = str(tmp_path / "planted")
    _weights_checkpoint_with(root, corpus, "layers.0.self_attention.linear_proj._extra_state", payload)
    pattern = (
        r"checkpoint file \S+ \(item \S*layers.0.self_attention.linear_proj._extra_state\S*\): " + REFUSED["system"]
    )
    _refused_everywhere(root, corpus, tmp_path, monkeypatch, pattern, marker, inspect_reads_it=False)


def test_planted_rng_state_is_refused_on_resume(dist1, corpus, tmp_path):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron.early_exit.checkpoint.errors import CheckpointError
    from megatron.early_exit.training import checkpointing

    marker, root = tmp_path / "code_ran", str(tmp_path / "ck")
    with pytest.MonkeyPatch.context() as patch:  # the save pickles the payload (its __reduce__ runs nothing)
        patch.setattr(
            checkpointing,
            "_rng_state",
            lambda: ShardedObject("rng_state", RunsCode(marker), (1, 1, 1), (0, 0, 0), replica_id=0),
        )
        run_training(tiny_run_flags(corpus, iters=2, **QUIET, **{"--save": root, "--lr-warmup-iters": 1}))
    with pytest.raises(CheckpointError, match=r"\(item rng_state\S*\): " + REFUSED["system"]):
        run_training(tiny_run_flags(corpus, iters=4, **QUIET, **{"--load": root, "--lr-warmup-iters": 1}))
    assert not marker.exists()


# ----------------------------------------------------------------------------- integrity


def test_manifest_lists_every_file_with_its_size(saved):
    from megatron.early_exit.checkpoint.checksums import MANIFEST, file_checksum, read_manifest

    path = os.path.join(saved, "iter_0000002")
    files = read_manifest(path)
    assert sorted(files) == sorted(n for n in os.listdir(path) if n != MANIFEST)
    assert {".metadata", "common.pt", "metadata.json"} <= set(files) and any(n.endswith(".distcp") for n in files)
    assert all(
        files[n] == [os.path.getsize(os.path.join(path, n)), file_checksum(os.path.join(path, n))] for n in files
    )


@pytest.mark.parametrize("damaged", ["shard", "common.pt"])
def test_flipped_byte_is_named_by_every_reader(saved, corpus, tmp_path, damaged):
    from megatron.early_exit.checkpoint.errors import CheckpointError
    from megatron.early_exit.inference import InferenceConfigError
    from megatron.early_exit.inference.loading import load_model

    root, path = _copy(saved, tmp_path)
    file = (
        sorted(glob.glob(os.path.join(path, "*.distcp")))[-1] if damaged == "shard" else os.path.join(path, "common.pt")
    )
    with open(file, "r+b") as f:
        f.seek(os.path.getsize(file) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    expected = f"checkpoint {'shard' if damaged == 'shard' else 'file'} {file}: checksum mismatch (damaged)"
    with pytest.raises(CheckpointError) as err:
        run_training(tiny_run_flags(corpus, iters=4, **QUIET, **{"--load": root, "--lr-warmup-iters": 1}))
    assert str(err.value) == expected
    with pytest.raises(InferenceConfigError, match=f"^{expected}$".replace("(", r"\(").replace(")", r"\)")):
        load_model(root)
    assert _inspect(root).stderr.strip().splitlines()[-1] == f"error: {expected}"


def test_checkpoint_without_manifest_still_loads(saved, tmp_path):
    from megatron.early_exit.checkpoint.checksums import MANIFEST
    from megatron.early_exit.inference.loading import load_model

    root, path = _copy(saved, tmp_path)
    os.remove(os.path.join(path, MANIFEST))
    assert load_model(root)[2].num_layers == 4
    assert "checksums         none" in _inspect(root).stdout


# ----------------------------------------------------------------------------- one writer, kill -9


def _descendants(pid):
    """Processes whose parent chain reaches `pid` (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _tagged(tag):
    """Live processes whose environment holds `tag` (children inherit it, also once re-parented)."""
    out = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and tag.encode() in open(f"/proc/{entry}/environ", "rb").read():
                if open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(int(entry))
        except OSError:
            pass
    return out


def _never_trains(*args, **kwargs):
    raise AssertionError("a second run on a locked --save went on to build its model and data")


@pytest.mark.parametrize("moment", ["writing", "before_rename"])
def test_kill_9_during_a_save_leaves_no_process_and_no_lock(dist1, corpus, tmp_path, moment, monkeypatch):
    from megatron.early_exit.checkpoint.errors import CheckpointError
    from megatron.early_exit.training import trainer

    root, paused, tag = str(tmp_path / "ck"), tmp_path / "paused", f"EE_TEST_TAG={uuid.uuid4().hex}"
    flags = {"--save": root, "--save-interval": 2, **QUIET}
    env = _fresh_process_env(EE_TEST_TAG=tag.split("=", 1)[1])
    pause = [os.path.join(ROOT, "tests", "checkpoint_pause.py"), f"{moment}:4:{paused}"]  # the trainer, paused
    proc = subprocess.Popen(
        [sys.executable, *pause] + tiny_run_flags(corpus, iters=6, **flags),
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: paused.exists() or proc.poll() is not None, timeout=300)
        assert proc.poll() is None, f"the trainer ended before the save of iteration 4: {proc.stderr.read()[-2000:]}"
        assert paused.exists(), "the save of iteration 4 never reached the pause"
        assert _descendants(proc.pid) == set(), "the save runs helper processes"
        with monkeypatch.context() as patch, pytest.raises(CheckpointError) as err:  # a second run on the same --save
            patch.setattr(trainer, "_train", _never_trains)  # it stops at once: before any model or data
            run_training(tiny_run_flags(corpus, iters=6, **flags))
        assert str(err.value).startswith(
            f"--save {root} is in use by another run (PID {proc.pid} on host {socket.gethostname()}"
        )
        os.kill(proc.pid, signal.SIGKILL)  # the trainer only, as a user's kill -9 <PID>
        proc.wait()
        assert wait_until(lambda: _tagged(tag) == [], timeout=10), "processes of the killed trainer are still running"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    resumed = run_training(
        tiny_run_flags(corpus, iters=6, **flags, **{"--load": root})
    )  # the dead run's lock blocks nothing
    assert len(resumed.history) == 4
    assert sorted(os.listdir(root)) == [
        "iter_0000002",
        "iter_0000004",
        "iter_0000006",
        "latest_checkpointed_iteration.txt",
    ]


# ----------------------------------------------------------------------------- non-finite values


def _nan_from(monkeypatch, start, where="loss"):
    """The loss (or only its gradient) turns NaN from this 0-based iteration on."""
    from megatron.early_exit.training import trainer

    real = trainer.early_exit_loss

    def loss(output, loss_mask, ee_config, iteration, **kwargs):
        total, report = real(output, loss_mask, ee_config, iteration, **kwargs)
        if iteration >= start:
            if where == "loss":
                total, report.lm_loss = total * float("nan"), report.lm_loss * float("nan")
            else:  # value unchanged, gradient NaN: d sqrt(x)/dx at 0 is inf, times 0
                total = total + 0.0 * torch.sqrt(total * 0.0)
        return total, report

    monkeypatch.setattr(trainer, "early_exit_loss", loss)


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_non_finite_stops_before_saving_and_keep_last_keeps_the_finite_one(dist1, corpus, tmp_path, monkeypatch, where):
    from megatron.early_exit.training.trainer import NonFiniteError

    root = str(tmp_path / "ck")
    _nan_from(monkeypatch, 2, where)
    with pytest.raises(NonFiniteError) as err:
        run_training(
            tiny_run_flags(corpus, iters=6, **QUIET, **{"--save": root, "--save-interval": 1, "--keep-last": 1})
        )
    text = str(err.value)
    assert text.startswith("iteration 3: lm loss is nan" if where == "loss" else "iteration 3: grad norm is nan"), text
    assert text.endswith(f"the latest checkpoint under --save {root} (iteration 2) is kept")
    assert sorted(os.listdir(root)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]


def test_nan_weights_loaded_with_finetune_stop_at_the_first_iteration(dist1, corpus, tmp_path):
    from megatron.early_exit.checkpoint.writer import save_weights
    from megatron.early_exit.training.arguments import build_run_config, parse_args
    from megatron.early_exit.training.trainer import NonFiniteError, build_model

    args = parse_args(tiny_run_flags(corpus, iters=4), world_size=1)
    model = build_model(build_run_config(args), torch.device("cpu"), VOCAB)
    with torch.no_grad():
        dict(model.named_parameters())["decoder.layers.1.mlp.linear_fc2.weight"][0, 0] = float("nan")
    save_weights(str(tmp_path / "nan"), vars(args), model)
    with pytest.raises(NonFiniteError, match=r"^iteration 1: lm loss is nan"):
        run_training(
            tiny_run_flags(
                corpus,
                iters=4,
                **QUIET,
                **{"--load": str(tmp_path / "nan"), "--finetune": None, "--save": str(tmp_path / "out")},
            )
        )
    assert os.listdir(tmp_path / "out") == []


def test_save_refuses_non_finite_weights(dist1, corpus, tmp_path):
    from megatron.early_exit.checkpoint.errors import CheckpointError
    from megatron.early_exit.training import checkpointing
    from megatron.early_exit.training.arguments import build_run_config, parse_args
    from megatron.early_exit.training.trainer import build_model, build_optimizer, wrap_model

    args = parse_args(tiny_run_flags(corpus, iters=4, **{"--save": str(tmp_path)}), world_size=1)
    model = wrap_model(build_model(build_run_config(args), torch.device("cpu"), VOCAB), build_run_config(args))
    optimizer, scheduler = build_optimizer(model, build_run_config(args))
    with torch.no_grad():
        dict(model.module.named_parameters())["exits.1.norm.weight"][3] = float("inf")
    with pytest.raises(
        CheckpointError,
        match=r"^iteration 5: the weights hold NaN or Inf \(exits.1.norm.weight\); "
        rf"not saved under --save {tmp_path}, whose checkpoints are kept$",
    ):
        checkpointing.save(build_run_config(args), model, optimizer, scheduler, 5, 40)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- start-up checks


def test_save_under_a_regular_file_is_named_at_once(dist1, corpus, tmp_path):
    from megatron.early_exit.checkpoint.errors import CheckpointError

    (tmp_path / "file").write_text("")
    for target, blocker in ((tmp_path / "file" / "ck", tmp_path / "file"), (tmp_path / "file", tmp_path / "file")):
        with pytest.raises(CheckpointError, match=f"^--save {target}: {blocker} is a file, not a directory$"):
            run_training(tiny_run_flags(corpus, iters=4, **QUIET, **{"--save": str(target)}))


@pytest.fixture
def read_only_dir(tmp_path):
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True
    ).returncode:
        pytest.skip("root cannot be refused a write here without a read-only mount, and mount is not permitted")
    yield path
    subprocess.run(["umount", "--lazy", str(path)], check=True)


def test_read_only_save_dir_is_named_at_once(dist1, corpus, read_only_dir):
    from megatron.early_exit.checkpoint.errors import CheckpointError

    with pytest.raises(
        CheckpointError,
        match=rf"^--save {read_only_dir} is not writable \((Read-only file system|Permission denied)\)$",
    ):
        run_training(tiny_run_flags(corpus, iters=4, **QUIET, **{"--save": str(read_only_dir)}))


@pytest.mark.parametrize(
    "vocab, expected",
    [
        (60, ["--vocab-size: checkpoint 64, now 60 (the NullTokenizer's vocabulary)"]),
        (
            100,
            [
                "--padded-vocab-size: checkpoint 64, now 128 (the tokenizer's vocabulary padded to a multiple of "
                "--make-vocab-size-divisible-by x TP)",
                "--vocab-size: checkpoint 64, now 100 (the NullTokenizer's vocabulary)",
            ],
        ),
    ],
)
def test_load_with_another_vocabulary_is_refused(saved, vocab, expected):
    from megatron.early_exit.checkpoint.errors import CheckpointError

    # Mock data: the corpus holds ids up to 63, which its own check refuses first at a vocabulary of 60.
    with pytest.raises(CheckpointError) as err:
        run_training(
            tiny_run_flags(
                None,
                iters=4,
                **QUIET,
                **{"--mock-data": None, "--load": saved, "--vocab-size": vocab, "--finetune": None},
            )
        )
    assert str(err.value).splitlines() == ["the checkpoint does not match this model:"] + [
        f"  {line}" for line in expected
    ]


def test_load_with_another_seq_length_and_learned_positions_is_refused(dist1, corpus, tmp_path):
    from megatron.early_exit.checkpoint.errors import CheckpointError

    learned = {**QUIET, "--position-embedding-type": "learned_absolute", "--lr-warmup-iters": 1}
    run_training(tiny_run_flags(corpus, iters=2, **learned, **{"--save": str(tmp_path)}))
    with pytest.raises(CheckpointError) as err:
        run_training(tiny_run_flags(corpus, iters=4, **learned, **{"--load": str(tmp_path), "--seq-length": 64}))
    assert str(err.value).splitlines()[1:] == [
        "  --max-position-embeddings: checkpoint 32, now 64 (the learned position embeddings; it defaults to "
        "--seq-length)"
    ]


def test_tokenizer_differences_are_listed(tmp_path):
    import dataclasses

    from megatron.early_exit.checkpoint.compatibility import compare_with_checkpoint
    from megatron.early_exit.checkpoint.errors import CheckpointError
    from megatron.early_exit.models.model_config import ModelConfig, TokenizerConfig

    for name, text in (("a.json", "{}"), ("b.json", '{"x": 1}'), ("c.json", "{}"), ("merges.txt", "")):
        (tmp_path / name).write_text(text)
    gpt2 = lambda vocab: TokenizerConfig(
        "GPT2BPETokenizer",
        vocab_file=str(tmp_path / vocab),  # noqa: E731
        merge_file=str(tmp_path / "merges.txt"),
    )
    base = ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        padded_vocab_size=64,
        max_position_embeddings=32,
        tokenizer=gpt2("a.json"),
    )
    assert compare_with_checkpoint(base, dataclasses.replace(base, tokenizer=gpt2("c.json"))) == []  # same contents
    with pytest.raises(CheckpointError) as err:
        compare_with_checkpoint(base, dataclasses.replace(base, tokenizer=gpt2("b.json")))
    assert f"--vocab-file: checkpoint {tmp_path / 'a.json'}, now {tmp_path / 'b.json'} (other contents)" in str(
        err.value
    )
    with pytest.raises(CheckpointError, match="--tokenizer-type: checkpoint GPT2BPETokenizer, now NullTokenizer"):
        compare_with_checkpoint(
            base, dataclasses.replace(base, tokenizer=TokenizerConfig("NullTokenizer", vocab_size=64))
        )
    # Llama 2's tokenizer gives SentencePiece's ids over the same model file (EE-LLM's scripts
    # pass Llama2Tokenizer to checkpoints converted with SentencePieceTokenizer); other files differ.
    for name, text in (("sp.model", "m1"), ("sp_copy.model", "m1"), ("other.model", "m2")):
        (tmp_path / name).write_text(text)
    sp = dataclasses.replace(
        base, tokenizer=TokenizerConfig("SentencePieceTokenizer", model=str(tmp_path / "sp.model"))
    )
    llama = lambda f: dataclasses.replace(base, tokenizer=TokenizerConfig("Llama2Tokenizer", model=str(tmp_path / f)))  # noqa: E731
    assert compare_with_checkpoint(sp, llama("sp_copy.model")) == []
    with pytest.raises(CheckpointError, match="--tokenizer-model: .* \\(other contents\\)"):
        compare_with_checkpoint(sp, llama("other.model"))
    with pytest.raises(
        CheckpointError, match="--tokenizer-type: checkpoint SentencePieceTokenizer, now HuggingFaceTokenizer"
    ):
        compare_with_checkpoint(
            sp, dataclasses.replace(base, tokenizer=TokenizerConfig("HuggingFaceTokenizer", model=str(tmp_path)))
        )


# ----------------------------------------------------------------------------- disk full


def test_no_space_left_during_a_save_is_one_line(dist1, corpus, tmp_path, monkeypatch):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron.early_exit.checkpoint.errors import CheckpointError
    from megatron.early_exit.training import checkpointing

    saving, real_check, real_write = {}, checkpointing.require_finite_weights, filesystem_async._write_item

    def check(model, iteration, root):
        saving["iteration"] = iteration
        return real_check(model, iteration, root)

    @functools.wraps(real_write)  # megatron-core reads its signature
    def write(*args, **kwargs):
        if saving["iteration"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(*args, **kwargs)

    monkeypatch.setattr(checkpointing, "require_finite_weights", check)
    monkeypatch.setattr(filesystem_async, "_write_item", write)
    root = str(tmp_path / "ck")
    with pytest.raises(CheckpointError) as err:
        run_training(tiny_run_flags(corpus, iters=3, **QUIET, **{"--save": root, "--save-interval": 1}))
    assert str(err.value) == (
        f"--save {root}: no space left on the device while saving iteration 2; the partial checkpoint "
        "was removed, the previous checkpoints are kept"
    )
    assert sorted(os.listdir(root)) == ["iter_0000001", "latest_checkpointed_iteration.txt"]


@pytest.mark.parametrize("size", ["4k", "256k"])
def test_a_really_full_file_system_is_one_line(dist1, corpus, tmp_path, size):
    from megatron.early_exit.checkpoint.errors import CheckpointError

    full = tmp_path / "full"
    full.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(full)], capture_output=True
        ).returncode
    ):
        pytest.skip("mounting a small file system needs root and permission to mount")
    try:
        with pytest.raises(
            CheckpointError, match=f"^--save {full}: no space left on the device while saving iteration 1;"
        ):
            run_training(tiny_run_flags(corpus, iters=1, **QUIET, **{"--save": str(full), "--lr-warmup-iters": 0}))
        assert os.listdir(full) == []
    finally:
        subprocess.run(["umount", "--lazy", str(full)], check=True)  # the error's traceback may still hold a file open
