import ast
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "multiproc: launched with torchrun (several processes)")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")


@pytest.fixture(scope="session")
def dist1():
    """A single-process world with megatron-core's parallel state (TP=PP=DP=1)."""
    import megatron.early_exit  # noqa: F401
    from megatron.early_exit.parallel import initialize_parallel

    return initialize_parallel(1, 1)


def case_names(module_name: str):
    """`case_*` functions of a multi-process case module, read without importing it."""
    path = os.path.join(ROOT, *module_name.split(".")) + ".py"
    tree = ast.parse(open(path).read())
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("case_")]


_LAUNCHES = {}


def launch(module_name: str, nproc: int, tmp_dir: str, timeout: int = 900, env: dict | None = None):
    """Run every case of `module_name` in one torchrun launch (cached per session)."""
    key = (module_name, nproc)
    if key not in _LAUNCHES:
        out = os.path.join(tmp_dir, f"{module_name.replace('.', '_')}_{nproc}.json")
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            os.path.join(ROOT, "tests", "multiproc", "runner.py"), module_name, out,
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}))
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        results = json.load(open(out)) if os.path.exists(out) else None
        _LAUNCHES[key] = (proc, results)
    proc, results = _LAUNCHES[key]
    if results is None:
        pytest.fail(f"torchrun launch of {module_name} failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return results


@pytest.fixture(scope="session")
def launch_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("launches"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A preprocessed, learnable NullTokenizer corpus (prefix of its .bin/.idx)."""
    from tests.training_fixtures import write_corpus

    return write_corpus(str(tmp_path_factory.mktemp("corpus")))
