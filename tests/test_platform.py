"""The CPU platform adapter and the parallel-state helper, in one process."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd="/",
        env=dict(os.environ, PYTHONWARNINGS="ignore", **env),
    )


def test_namespace_package_not_hidden():
    """megatron.core and megatron.early_exit both import from the installed package,
    which fails if someone adds megatron/__init__.py."""
    assert not os.path.exists(os.path.join(ROOT, "megatron", "__init__.py"))
    proc = _python(
        "import megatron, megatron.core, megatron.early_exit, megatron.early_exit.parallel;"
        "print(getattr(megatron, '__file__', None)); print(len(list(megatron.__path__)))"
    )
    assert proc.returncode == 0, proc.stderr
    file_line, paths = proc.stdout.split()
    assert file_line == "None"  # a namespace package has no __init__ file
    assert int(paths) >= 2  # megatron-core's portion and ours


def test_wrong_megatron_core_version_is_refused():
    from megatron.early_exit.platform import PlatformError, check_megatron_core_version

    with pytest.raises(PlatformError, match=r"megatron-core 0\.15\.0 .*megatron-core==0\.16\.1"):
        check_megatron_core_version("0.15.0")
    check_megatron_core_version("0.16.1")


def test_wrong_version_at_import_is_one_line():
    code = "import megatron.core.package_info as p; p.__version__ = '0.17.0';import megatron.early_exit"
    proc = _python(code)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: megatron-core 0.17.0 is installed but this package needs megatron-core==0.16.1; "
        "run `pip install megatron-core==0.16.1`"
    ]


def test_harmless_third_party_warnings_hidden_unless_asked():
    """Apex/Transformer Engine missing and megatron-core's own deprecations are hidden by
    our import; EE_SHOW_WARNINGS=1 (or python -W) brings them back."""
    code = (
        "import megatron.early_exit, megatron.core.models.gpt.gpt_layer_specs, megatron.core.optimizer;"
        "import warnings; warnings.warn('ours stays visible')"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "EE_SHOW_WARNINGS")}
    # Both at once (each is one import, single-threaded): half the wall time on two cores.
    start = lambda **extra: subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
        env=dict(env, **extra),
    )
    procs = start(), start(EE_SHOW_WARNINGS="1")
    outputs = [p.communicate(timeout=600) for p in procs]
    quiet, shown = (subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(procs, outputs))
    assert quiet.returncode == 0 and shown.returncode == 0, quiet.stderr + shown.stderr
    assert "ours stays visible" in quiet.stderr and "ours stays visible" in shown.stderr
    assert "Apex" not in quiet.stderr and "Transformer Engine" not in quiet.stderr
    assert "Apex is not installed" in shown.stderr and "Transformer Engine and Apex are not installed" in shown.stderr


def test_adapter_scoped_to_megatron_core(dist1):
    import megatron.core.tensor_parallel.layers as layers
    import megatron.core.utils as mutils

    from megatron.early_exit import platform

    assert platform.is_applied()
    assert mutils.torch is not torch and layers.torch is not torch
    # Redirects inside megatron-core...
    assert mutils.torch.cuda.current_device() == torch.device("cpu")
    assert mutils.torch.tensor([1.0], device="cuda").device.type == "cpu"
    assert mutils.torch.zeros(2, device="cuda", pin_memory=True).device.type == "cpu"
    # ...but user code keeps the real torch, where CUDA calls still fail.
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()
    # Type names are CUDA-like only inside the wrapped optimizer functions.
    assert torch.zeros(1).type() == "torch.FloatTensor"
    with platform._cuda_type_names():
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
        assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(1).type() == "torch.FloatTensor"


def test_adapter_does_nothing_with_cuda():
    code = (
        "import torch; torch.cuda.is_available = lambda: True;"
        "import megatron.early_exit, megatron.core.utils as u;"
        "from megatron.early_exit import platform;"
        "print(platform.is_applied(), u.torch is torch)"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True"]


def test_adapter_applies_for_a_cpu_target_with_cuda():
    """On a CUDA machine, initialize_parallel(device="cpu") applies the adapter before
    megatron-core seeds its RNG tracker; megatron-core then sees no CUDA, and the process
    cannot turn to CUDA any more."""
    code = (
        "import torch; torch.cuda.is_available = lambda: True\n"
        "import megatron.early_exit, megatron.core.utils as u\n"
        "from megatron.early_exit import platform\n"
        "from megatron.early_exit.parallel import ParallelConfigError, initialize_parallel, resolve_device, "
        "target_device\n"
        "if __name__ == '__main__':\n"
        "    before = platform.is_applied()\n"
        "    initialize_parallel(1, 1, device='cpu')\n"
        "    try:\n"
        "        resolve_device('cuda'); refused = ''\n"
        "    except ParallelConfigError as err:\n"
        "        refused = str(err)\n"
        "    print(before, platform.is_applied(), u.torch.cuda.is_available(), torch.cuda.is_available(), "
        "target_device(),"
        " resolve_device(None))\n"
        "    print(refused)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=dict(env, PYTHONWARNINGS="ignore")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, refused = proc.stdout.strip().splitlines()[-2:]
    assert first.split() == ["False", "True", "False", "True", "cpu", "cpu"]
    assert refused == (
        "device 'cuda' was requested but this process already runs megatron-core on the CPU "
        "(the CPU platform adapter is applied); start a new process for CUDA"
    )


def test_rng_tracker_fork_is_reproducible_and_isolated(dist1):
    from megatron.core import tensor_parallel

    from megatron.early_exit.parallel import set_seed

    set_seed(3)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    outside_before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outside_before), "fork must not consume the default stream"
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b), "the forked stream advances"
    set_seed(3)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), a)


def test_gpt_forward_backward_and_dropout_seeded(dist1):
    from megatron.early_exit.parallel import set_seed
    from tests.helpers import build_gpt, make_batch, tiny_transformer_config

    model = build_gpt(tiny_transformer_config(hidden_dropout=0.1, attention_dropout=0.1))
    tokens, labels, pos = make_batch()

    def run(seed):
        set_seed(seed)
        model.zero_grad()
        loss = model(tokens, pos, None, labels=labels).mean()
        loss.backward()
        return loss.item(), model.decoder.layers[0].mlp.linear_fc1.weight.grad.clone()

    l1, g1 = run(5)
    l2, g2 = run(5)
    l3, _ = run(6)
    assert torch.isfinite(torch.tensor(l1)) and g1.abs().sum() > 0
    assert l1 == l2 and torch.equal(g1, g2)
    assert l1 != l3


@pytest.mark.parametrize(
    "world,tp,pp,message",
    [
        (
            3,
            2,
            1,
            r"world size 3 is not divisible by --tensor-model-parallel-size \(2\) x "
            r"--pipeline-model-parallel-size \(1\) = 2",
        ),
        (4, 1, 3, r"world size 4 is not divisible .*--pipeline-model-parallel-size \(3\)"),
        (2, 0, 1, r"--tensor-model-parallel-size must be >= 1, got 0"),
    ],
)
def test_layout_errors_name_the_flag(world, tp, pp, message):
    from megatron.early_exit.parallel import ParallelConfigError, validate_layout

    with pytest.raises(ParallelConfigError, match=message):
        validate_layout(world, tp, pp)


def test_cuda_requested_without_cuda():
    from megatron.early_exit.parallel import ParallelConfigError, resolve_device

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ParallelConfigError, match="device 'cuda' was requested but CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device(None) == torch.device("cpu")


def test_bad_layout_under_torchrun_is_one_line(tmp_path):
    script = tmp_path / "start.py"
    script.write_text(
        "import megatron.early_exit\n"
        "from megatron.early_exit.parallel import initialize_parallel\n"
        "if __name__ == '__main__':\n"
        "    initialize_parallel(2, 1)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", str(script)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"),
    )
    assert proc.returncode != 0
    assert "error: world size 1 is not divisible by --tensor-model-parallel-size (2)" in proc.stderr
    # No traceback from inside our package or megatron-core: the worker printed one line.
    assert "parallel.py" not in proc.stderr and "megatron/core" not in proc.stderr
