"""A 2-process training run under torchrun, treated as a cluster treats it: its launcher
killed with kill -9 (the workers must not train on, holding --save), and SIGTERM sent to
the whole job at once, as a scheduler does at its time limit (the run says at start how
long torchrun will wait, and saves at once)."""

import fcntl
import os
import re
import signal
import subprocess
import sys
import threading

import pytest

from tests.conftest import ROOT
from tests.helpers import wait_until
from tests.training_fixtures import tiny_run_flags

psutil = pytest.importorskip("psutil")


def job_env() -> dict:
    """This environment without this process's rendezvous (the job starts its own)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    return dict(env, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")


class Job:
    """torchrun with 2 workers of pretrain_early_exit_gpt.py in a session of its own; its output
    collected line by line."""

    def __init__(self, argv, launcher_flags=()):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            *launcher_flags,
            os.path.join(ROOT, "pretrain_early_exit_gpt.py"),
            *argv,
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=job_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, pattern: str, timeout: float = 600) -> None:
        seen = lambda: any(re.search(pattern, line) for line in self.lines)  # noqa: E731
        wait_until(lambda: seen() or self.proc.poll() is not None, timeout=timeout, interval=0.05)
        assert seen(), "".join(self.lines[-40:])

    def workers(self):
        return [
            p for p in psutil.Process(self.proc.pid).children(recursive=True) if "pretrain" in " ".join(p.cmdline())
        ]

    def output(self) -> str:
        self.reader.join(timeout=30)
        return "".join(self.lines)


def _gone(processes, timeout: float) -> bool:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return not alive


@pytest.mark.slow  # a 2-process run: ~40 s to a few minutes on a shared 2-core machine
@pytest.mark.multiproc
def test_workers_exit_when_their_launcher_is_killed(corpus, tmp_path):
    save = str(tmp_path / "ckpt")
    job = Job(
        tiny_run_flags(
            corpus, iters=100000, **{"--save": save, "--save-interval": 100000, "--log-interval": 1, "--eval-iters": 0}
        )
    )
    workers = []
    try:
        job.wait_for(r" iteration +2/")
        workers = job.workers()
        assert len(workers) == 2
        job.proc.kill()  # kill -9 of the launcher alone
        job.proc.wait(timeout=60)
        assert _gone(workers, timeout=60), [p.pid for p in workers if p.is_running()]
    finally:
        for p in workers:  # the workers this test started, should they have outlived the check
            if p.is_running():
                p.kill()
    assert "error: the torchrun launcher (PID" in job.output()
    with open(os.path.join(save, ".lock"), "a") as lock:  # --save is free for the next run
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.slow
@pytest.mark.multiproc
def test_sigterm_to_the_whole_job_saves_at_once_within_the_launcher_grace(corpus, tmp_path):
    save = str(tmp_path / "ckpt")
    job = Job(
        tiny_run_flags(
            corpus,
            iters=100000,
            **{
                "--save": save,
                "--exit-signal-handler": None,
                "--log-interval": 1,
                "--eval-interval": 1,
                "--eval-iters": 1,
            },
        ),
        launcher_flags=["--shutdown-timeout", "45"],
    )
    try:
        job.wait_for(r"validation loss at iteration +2\b")
        os.killpg(job.proc.pid, signal.SIGTERM)  # launcher and workers together, as a scheduler signals a job
        job.proc.wait(timeout=300)
    finally:
        if job.proc.poll() is None:
            os.killpg(job.proc.pid, signal.SIGKILL)
    out = job.output()
    assert re.search(
        r"--exit-signal-handler: on SIGTERM every rank finishes its iteration, saves and exits 0; torchrun, "
        r"when signalled too, kills the workers 45 s later \(torchrun --shutdown-timeout\)",
        out,
    ), out[-3000:]
    (stop,) = [int(m) for m in re.findall(r" exiting at iteration (\d+): SIGTERM received", out)]
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == str(stop)
    # The save started at once: no validation of the stopping iteration ran before it.
    assert not re.search(rf"validation loss at iteration +{stop}\b", out), out[-3000:]


def test_shutdown_grace_is_read_from_the_launcher_then_the_environment(monkeypatch):
    from megatron.early_exit.launcher import shutdown_grace_seconds

    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    assert shutdown_grace_seconds(["torchrun", "--shutdown-timeout", "90", "x.py"]) == (
        90.0,
        "torchrun --shutdown-timeout",
    )
    assert shutdown_grace_seconds(["torchrun", "--shutdown_timeout=12"]) == (12.0, "torchrun --shutdown_timeout")
    assert shutdown_grace_seconds(["torchrun"]) == (30.0, "torchrun's default")
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300")
    assert shutdown_grace_seconds(["torchrun"]) == (300.0, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")


def test_reshard_refusal_is_one_line(dist1, tmp_path):
    """A layout the checkpoint cannot take is refused before any process starts (it was
    followed by ~30 lines of torchrun's ChildFailedError)."""
    import torch

    from megatron.early_exit.checkpoint.writer import save_weights
    from megatron.early_exit.training.arguments import build_run_config, parse_args
    from megatron.early_exit.training.trainer import build_model

    args = parse_args(tiny_run_flags(None, iters=4, **{"--mock-data": None}), world_size=1)
    root = str(tmp_path / "ckpt")
    save_weights(root, vars(args), build_model(build_run_config(args), torch.device("cpu"), 64), iteration=1)
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "checkpoint", "reshard.py"),
            "--load",
            root,
            "--save",
            str(tmp_path / "pp3"),
            "--target-pipeline-parallel-size",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=job_env(),
    )
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: --target-pipeline-parallel-size 3 does not divide the checkpoint's 4 layers"
    ], proc.stderr[-3000:]
    assert not os.path.exists(tmp_path / "pp3")


def test_reshard_reports_only_the_workers_errors(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("reshard", os.path.join(ROOT, "tools", "checkpoint", "reshard.py"))
    reshard = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reshard)
    noise = (
        "Traceback (most recent call last):\n  File ...\ntorch.distributed.elastic.multiprocessing.errors."
        "ChildFailedError:\n[rank1]: error: checkpoint shard X is missing\nerror: checkpoint shard X is missing\n"
    )
    assert reshard._report(1, noise) == 1
    assert capsys.readouterr().err == "error: checkpoint shard X is missing\n"
    assert reshard._report(0, "a warning\n") == 0 and capsys.readouterr().err == "a warning\n"
