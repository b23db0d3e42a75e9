"""A text generation server as a real process on a loopback port, for the server tests."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(ROOT, "tools", "run_text_generation_server.py")


class Server:
    """A server process (torchrun when nproc > 1) in its own session, logging to a file."""

    def __init__(self, root: str, log_path: str, nproc: int = 1, layout_flag: str = "--tensor-model-parallel-size",
                 extra=(), max_batch: int = 8, max_prompt: int = 40):
        flags = ["--load", root, "--port", "0", "--max-batch-size", str(max_batch), "--max-prompt-tokens",
                 str(max_prompt), "--log-level", "warning", "--model-name", "tiny", *extra]
        if nproc == 1:
            cmd = [sys.executable, SERVER, *flags]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", SERVER,
                   *flags, layout_flag, str(nproc)]
        self.log_path = log_path
        self.log = open(log_path, "w")
        env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
        env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")  # this process's own rendezvous stays its own
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self._url = None

    @property
    def url(self) -> str:
        deadline = time.monotonic() + 240
        while self._url is None:
            found = re.search(r"serving \S+ on (http://\S+)", open(self.log_path).read())
            if found:
                self._url = found.group(1)
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not start (rc={self.proc.poll()}):\n{self.tail()}")
            else:
                time.sleep(0.2)
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
