"""CPU platform adapter for megatron-core.

megatron-core 0.16.1 is written for CUDA. Its tensor-parallel layers, GPT model,
DDP, optimizers and dist_checkpointing are device-agnostic in their math, but
reach for CUDA in a few places: `torch.cuda.current_device()` as an allocation
device, literal `device="cuda"` tensors, `torch.cuda.synchronize/Event/stream`,
the CUDA RNG tracker, and `param.type() == 'torch.cuda.FloatTensor'` checks.

`apply()` redirects exactly those calls to the CPU when megatron-core is to run on
the CPU: at import when CUDA is absent, and from `initialize_parallel(device="cpu")`
on a CUDA machine too (before megatron-core seeds its RNG tracker or allocates). For
a CUDA target it does nothing. Once applied, megatron-core sees a machine without
CUDA, for the rest of the process. Every redirect is scoped to megatron-core's own
modules: the `torch` name inside each `megatron.core.*` module is swapped for a
proxy, so user code and other libraries keep seeing the real `torch`.

Our own code takes a `device` and never needs any of this.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types

import torch

from megatron.early_exit.errors import EarlyExitError

PINNED_MEGATRON_CORE = "0.16.1"

_applied = False


class PlatformError(EarlyExitError):
    """A one-line, user-facing problem with the runtime platform."""


def check_megatron_core_version(found: str | None = None) -> None:
    """Refuse any megatron-core other than the pinned one: the redirects below
    name file-level behaviour of that release."""
    if found is None:
        from megatron.core.package_info import __version__ as found
    if found != PINNED_MEGATRON_CORE:
        raise PlatformError(
            f"megatron-core {found} is installed but this package needs megatron-core=="
            f"{PINNED_MEGATRON_CORE}; run `pip install megatron-core=={PINNED_MEGATRON_CORE}`"
        )


# ---------------------------------------------------------------------------
# torch.cuda as megatron-core sees it on a CPU machine
# ---------------------------------------------------------------------------


def _cpu_device(device=None):
    """Map any CUDA device spec (\"cuda\", \"cuda:0\", 0, torch.device('cuda')) to CPU."""
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _NullStream:
    """Stands in for torch.cuda.Stream: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event or _CpuEvent()


class _CpuEvent:
    """Stands in for torch.cuda.Event with wall-clock timing (used for timers)."""

    def __init__(self, enable_timing: bool = False, **kwargs):
        self._time = None

    def record(self, stream=None):
        import time

        self._time = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, end: "_CpuEvent") -> float:
        return (end._time - self._time) * 1000.0


def _make_cuda_shim() -> types.SimpleNamespace:
    """The `torch.cuda` seen by megatron-core modules when CUDA is absent.
    Attributes not listed here fall through to the real torch.cuda."""
    real = torch.cuda
    overrides = dict(
        # utils.py:631 global memory buffer, rotary_pos_embedding.py:162, mappings.py (SP
        # gather/scatter), param_and_grad_buffer.py (DDP buffers) allocate on current_device().
        current_device=lambda: torch.device("cpu"),
        # p2p_communication.py:242, filesystem_async.py:230 (checkpoint preload), DDP free/alloc.
        synchronize=lambda device=None: None,
        empty_cache=lambda: None,
        # distributed_data_parallel.py:230 and param_and_grad_buffer.py:417 (overlapped comm).
        Stream=_NullStream,
        current_stream=lambda device=None: _NullStream(),
        default_stream=lambda device=None: _NullStream(),
        stream=lambda s=None: contextlib.nullcontext(),
        # text_generation_controller.py:1163 and timers.
        Event=_CpuEvent,
        # random.py model_parallel_cuda_manual_seed seeds "the device generator": the CPU one here.
        manual_seed=torch.manual_seed,
        get_rng_state=lambda device="cuda": torch.get_rng_state(),
        set_rng_state=lambda state, device="cuda": torch.set_rng_state(state),
        nvtx=types.SimpleNamespace(range_push=lambda msg: None, range_pop=lambda: None),
        # A CPU target on a CUDA machine: megatron-core must not take CUDA paths
        # (dist_checkpointing's TE import, async_utils.py:488 set_device, timers).
        is_available=lambda: False,
        device_count=lambda: 0,
    )

    class _CudaShim:
        def __getattr__(self, name):
            if name in overrides:
                return overrides[name]
            return getattr(real, name)

    return _CudaShim()


def _device_redirecting(factory):
    """Wrap a tensor factory so `device="cuda"` (optimizer.py:907, clip_grads.py:90,
    param_and_grad_buffer.py:768, ...) allocates on CPU and `pin_memory=True`
    (needs an accelerator) is dropped."""

    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return factory(*args, **kwargs)

    return wrapper


_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "randn", "rand", "as_tensor")


class _TorchProxy(types.ModuleType):
    """The `torch` module as megatron-core modules see it on a CPU machine."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _make_cuda_shim()
        for name in _FACTORIES:
            setattr(self, name, _device_redirecting(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


# ---------------------------------------------------------------------------
# RNG tracker: megatron-core keeps named CUDA generator states and forks them
# (attention forks even at dropout 0, dot_product_attention.py:217).
# ---------------------------------------------------------------------------


def _make_cpu_rng_tracker_class(base):
    class CpuRNGStatesTracker(base):
        """CudaRNGStatesTracker whose named states live in the CPU default generator."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


# ---------------------------------------------------------------------------
# Tensor methods: optimizer.py:671/690, distrib_optimizer.py:361/420/582 and
# clip_grads.py:167 accept only 'torch.cuda.*Tensor'; language_module.py:244
# moves the tied output weight with `.cuda()`. While those functions run, CPU
# tensors report the CUDA type name of their dtype and `.cuda()` keeps them put.
# ---------------------------------------------------------------------------

_real_tensor_type = torch.Tensor.type
_real_tensor_cuda = torch.Tensor.cuda


def _cuda_named_type(self, dtype=None, non_blocking=False, **kwargs):
    if dtype is None and not kwargs and self.device.type == "cpu":
        return _real_tensor_type(self).replace("torch.", "torch.cuda.", 1)
    return _real_tensor_type(self, dtype, non_blocking, **kwargs)


def _stay_on_cpu(self, *args, **kwargs):
    return self


@contextlib.contextmanager
def _cuda_type_names():
    torch.Tensor.type = _cuda_named_type
    torch.Tensor.cuda = _stay_on_cpu
    try:
        yield
    finally:
        torch.Tensor.type = _real_tensor_type
        torch.Tensor.cuda = _real_tensor_cuda


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    return wrapper


def _megatron_core_modules():
    return [
        m
        for name, m in list(sys.modules.items())
        if (name == "megatron.core" or name.startswith("megatron.core.")) and m is not None
    ]


def _import_used_modules():
    """Import the parts of megatron-core this package uses, so that they get patched."""
    import importlib

    for name in (
        "megatron.core.parallel_state",
        "megatron.core.tensor_parallel",
        "megatron.core.models.gpt",
        "megatron.core.optimizer",
        "megatron.core.optimizer.clip_grads",
        "megatron.core.optimizer.distrib_optimizer",
        "megatron.core.distributed",
        "megatron.core.distributed.finalize_model_grads",
        "megatron.core.dist_checkpointing",
        "megatron.core.dist_checkpointing.strategies.filesystem_async",
        "megatron.core.dist_checkpointing.strategies.torch",
        "megatron.core.dist_checkpointing.strategies.state_dict_saver",
        "megatron.core.dist_checkpointing.strategies.async_utils",
        "megatron.core.dist_checkpointing.strategies.fully_parallel",
        "megatron.core.pipeline_parallel",
        "megatron.core.pipeline_parallel.p2p_communication",
        "megatron.core.optimizer_param_scheduler",
        "megatron.core.num_microbatches_calculator",
        "megatron.core.datasets.blended_megatron_dataset_builder",
        "megatron.core.datasets.gpt_dataset",
    ):
        importlib.import_module(name)


def patch_loaded_modules() -> int:
    """Point the `torch` name of every loaded megatron-core module at the CPU proxy.
    Idempotent; call again after importing further megatron-core modules."""
    if not _applied:
        return 0
    count = 0
    for module in _megatron_core_modules():
        if getattr(module, "torch", None) is torch:
            module.torch = _PROXY
            count += 1
    return count


_PROXY: _TorchProxy | None = None


def apply(target_device=None) -> bool:
    """Install the CPU redirects when megatron-core will run on the CPU: when
    `target_device` is a CPU device, or (`None`, as at import) when CUDA is absent.
    Returns True if applied (now or before)."""
    global _applied, _PROXY
    check_megatron_core_version()
    if _applied:
        return True
    on_cpu = not torch.cuda.is_available() if target_device is None else torch.device(target_device).type == "cpu"
    if not on_cpu:
        return False
    _import_used_modules()
    _PROXY = _TorchProxy()
    _applied = True
    patch_loaded_modules()

    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.tensor_parallel import random

    random.CudaRNGStatesTracker = _make_cpu_rng_tracker_class(random.CudaRNGStatesTracker)
    random._CUDA_RNG_STATE_TRACKER = None
    random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    # Functions in random.py that other modules imported by name before we ran.
    random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    clip_grads.clip_grad_by_total_norm_fp32 = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    for cls, attr in (
        (optimizer.Float16OptimizerWithFloat16Params, "__init__"),
        (distrib_optimizer.DistributedOptimizer, "__init__"),
        (distrib_optimizer.DistributedOptimizer, "get_parameter_state_dp_zero"),  # :1089 .cuda()
        (LanguageModule, "setup_embeddings_and_output_layer"),
    ):
        original = cls.__dict__[attr]
        if isinstance(original, (staticmethod, classmethod)):
            setattr(cls, attr, type(original)(_with_cuda_type_names(original.__func__)))
        else:
            setattr(cls, attr, _with_cuda_type_names(original))
    # Modules that imported clip_grad_by_total_norm_fp32 by name.
    for module in _megatron_core_modules():
        if getattr(module, "clip_grad_by_total_norm_fp32", None) is not None and module is not clip_grads:
            module.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32
    return True


def is_applied() -> bool:
    return _applied


# Apex's fused softmax kernels: megatron-core imports them unguarded inside the
# attention forward when masked_softmax_fusion is on, so ask only for what imports.
FUSED_SOFTMAX_MODULES = ("scaled_upper_triang_masked_softmax_cuda", "scaled_masked_softmax_cuda", "scaled_softmax_cuda")


def fused_softmax_available(device: torch.device) -> bool:
    """Whether megatron-core's masked_softmax_fusion can run on `device`."""
    import importlib

    if device.type != "cuda":
        return False
    try:
        for name in FUSED_SOFTMAX_MODULES:
            importlib.import_module(name)
    except ImportError:
        return False
    return True


# megatron-core's fused bias-dropout-add is decorated with `megatron.core.jit.jit_fuser`,
# torch.compile on torch >= 2.2: with bias_dropout_fusion on CUDA it compiles in the first
# forward, through Triton, which builds its launcher with a C compiler and Python.h.
_fusion_notice_printed = False


def torch_compile_missing() -> str | None:
    """What torch.compile lacks on this host to build CUDA kernels, or None."""
    import importlib.util
    import os
    import shutil
    import sysconfig

    if importlib.util.find_spec("triton") is None:
        return "Triton"
    if not any(shutil.which(c) for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c):
        return "a C compiler (cc, gcc or clang; or $CC)"
    if not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        return "Python.h (the Python development headers, e.g. the python3-dev package)"
    return None


def bias_dropout_fusion_available(device: torch.device) -> bool:
    """Whether megatron-core's compiled bias-dropout-add can be built on `device`; on CUDA
    without what it needs, says so in one line (once) instead of failing inside training."""
    global _fusion_notice_printed

    if device.type != "cuda":
        return False
    missing = torch_compile_missing()
    if missing is None:
        return True
    if not _fusion_notice_printed:
        print(f"bias-dropout fusion off: torch.compile needs {missing}, missing here", flush=True)
        _fusion_notice_printed = True
    return False
