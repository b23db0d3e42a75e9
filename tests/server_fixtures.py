"""The text generation server's test model and process, shared by the server test files.

The checkpoint is a tiny random model (4 layers, exits after layers 1 and 2, NullTokenizer:
prompts are token ids as text); its exit confidences spread over a range where a threshold
mixes early and full-depth tokens. conftest.py writes it once per session and starts one
server process on it (`shared_server`, with CHAT_TEMPLATE) that the server test files share.
"""

import os
import re
import signal
import subprocess
import sys

import pytest

from tests.helpers import tiny_model_flags, wait_until, write_random_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(ROOT, "tools", "run_text_generation_server.py")
CLI = os.path.join(ROOT, "tools", "text_generation_cli.py")
NUM_LAYERS, EXITS, MAX_SEQ, VOCAB, EOD = 4, [1, 2], 64, 100, 99
MAX_BATCH, MAX_PROMPT = 8, 40
PROMPTS = ["5 17 3", "40 2 77 13 8 61 9 30", "11 12 13 14 15"]
MIXED_THRESHOLD = 0.16  # some tokens leave early, some go to full depth (checked)
# A chat template over token-id text: each message's content, then the generation prompt.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}1 {% endif %}"


def write_checkpoint(root: str, seq_length: int = MAX_SEQ) -> None:
    write_random_checkpoint(root, tiny_model_flags(NUM_LAYERS, seq_length, VOCAB, EXITS, seed=5), 128)


class Server:
    """A server process (torchrun when nproc > 1) in its own session, logging to a file."""

    def __init__(
        self,
        root: str,
        log_path: str,
        nproc: int = 1,
        layout_flag: str = "--tensor-model-parallel-size",
        extra=(),
        max_batch: int = MAX_BATCH,
        max_prompt: int = MAX_PROMPT,
    ):
        flags = [
            "--load",
            root,
            "--port",
            "0",
            "--max-batch-size",
            str(max_batch),
            "--max-prompt-tokens",
            str(max_prompt),
            "--log-level",
            "warning",
            "--model-name",
            "tiny",
            *extra,
        ]
        if nproc == 1:
            cmd = [sys.executable, SERVER, *flags]
        else:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={nproc}",
                SERVER,
                *flags,
                layout_flag,
                str(nproc),
            ]
        self.log_path = log_path
        self.log = open(log_path, "w")
        env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
        env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")  # this process's own rendezvous stays its own
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self._url = None

    @property
    def url(self) -> str:
        if self._url is None:
            found = lambda: re.search(r"serving \S+ on (http://\S+)", open(self.log_path).read())  # noqa: E731
            wait_until(lambda: found() or self.proc.poll() is not None, timeout=240, interval=0.2)
            if not found():
                pytest.fail(f"the server did not start (rc={self.proc.poll()}):\n{self.tail()}")
            self._url = found().group(1)
        return self._url

    def tail(self) -> str:
        return open(self.log_path).read()[-4000:]

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                break
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        self.log.close()


def ids(text):
    return [int(t) for t in text.split()]


def put_api(client, **body):
    reply = client.put("/api", json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()


class InProcessServer:
    """An app and its worker in threads of this process (uvicorn on a loopback port)."""

    def __init__(self, service, worker):
        import threading

        import uvicorn

        from megatron.early_exit.server.app import build_app

        self.service, self.worker = service, worker
        self.server = uvicorn.Server(uvicorn.Config(build_app(service), host="127.0.0.1", port=0, log_level="warning"))
        self.threads = [
            threading.Thread(target=self.server.run, daemon=True),
            threading.Thread(target=worker.run, daemon=True),
        ]
        for t in self.threads:
            t.start()
        assert wait_until(lambda: self.server.started, timeout=60, interval=0.05), "the in-process server did not start"
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def close(self):
        self.worker.stop()
        self.server.should_exit = True
        for t in self.threads:
            t.join(timeout=30)
