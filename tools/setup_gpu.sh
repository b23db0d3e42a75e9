#!/usr/bin/env bash
# The GPU kernels megatron-core uses when they import, installed into the project's venv on a
# CUDA host (make setup-gpu; docs/gpu.md says what each gives and why apex is not here).
#
#   bash tools/setup_gpu.sh [PYTHON]          install what can be installed, then report
#   bash tools/setup_gpu.sh --check [PYTHON]  report only (one JSON line), install nothing
#
# Each install may fail on its own (no CUDA toolkit, no matching wheel) without stopping the
# others; the report names what is importable afterwards. Exit status 0 unless asked to
# install on a host without CUDA.
set -u
CHECK=0
if [ "${1:-}" = "--check" ]; then CHECK=1; shift; fi
PY=${1:-.venv/bin/python}
FLASH_BUILD_LIMIT=${FLASH_BUILD_LIMIT:-900}  # seconds: flash-attn compiles for hours without a prebuilt wheel

report() {
  "$PY" - <<'EOF'
import importlib.util, json, shutil, sys, sysconfig, os
import torch
def have(*names):
    return any(importlib.util.find_spec(n) for n in names)
def version(dist):
    from importlib.metadata import PackageNotFoundError, version as v
    try:
        return v(dist)
    except PackageNotFoundError:
        return None
print(json.dumps({
    "cuda": torch.cuda.is_available(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
    "transformer_engine": version("transformer_engine") if have("transformer_engine") else None,
    "flash_attn": version("flash_attn") if have("flash_attn", "flash_attn_interface") else None,
    "triton": version("triton") if have("triton") else None,
    "c_compiler": any(shutil.which(c) for c in ("cc", "gcc", "clang")),
    "python_headers": os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")),
    "apex": "not installed: NVIDIA apex is a source build from GitHub (the PyPI name is another package); "
            "Transformer Engine provides the fused Adam, norms and softmax megatron-core would take from it",
}))
EOF
}

if [ "$CHECK" = 1 ]; then report; exit $?; fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: setup-gpu needs a CUDA build of PyTorch and a visible GPU (this host has none); make setup is the CPU set-up" >&2
  exit 1
fi
# --no-build-isolation: both build their PyTorch extension against the torch installed here.
"$PY" -m pip install --upgrade pip setuptools wheel packaging ninja psutil pybind11 >/dev/null
echo "installing Transformer Engine (its PyTorch extension builds against this torch: a few minutes) ..."
"$PY" -m pip install --no-build-isolation "transformer_engine[pytorch]" \
  || echo "transformer_engine: not installed (needs the CUDA toolkit headers and cuDNN; see the pip output above)"
echo "installing flash-attn (a prebuilt wheel when one matches this torch, CUDA and Python; else a build, given up after ${FLASH_BUILD_LIMIT}s) ..."
MAX_JOBS=${MAX_JOBS:-8} timeout "$FLASH_BUILD_LIMIT" "$PY" -m pip install --no-build-isolation flash-attn \
  || echo "flash-attn: not installed (no prebuilt wheel for this torch/CUDA/Python and the build did not finish; Transformer Engine's fused attention serves instead)"
report
