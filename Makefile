# One command to set up, one to test, one to run the main job.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Where pip finds the CPU build of PyTorch, as an extra index URL. Empty: pip's own configuration
# (here a local wheel folder). Elsewhere, without it, pip takes the multi-GB CUDA build from PyPI:
# make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH_PIP_FLAGS := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))

.PHONY: setup setup-gpu test test-slow test-fast test-gpu bench-gpu lint format demo clean

setup: $(STAMP)

$(STAMP): setup.py
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python 3.11 is required; set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	# The CPU build of PyTorch when there is no GPU (from TORCH_INDEX, or pip's configured wheel folder).
	@if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install torch; else $(PY) -m pip install $(TORCH_PIP_FLAGS) torch==2.13.0; fi
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

# The CPU suite runs on CPU even on a GPU host (hidden CUDA devices: gloo, the CPU adapter).
test: setup
	CUDA_VISIBLE_DEVICES= $(PY) -m pytest -x -q -n 2 --dist loadgroup --durations=15 -m "not gpu and not slow" tests

# Long end-to-end runs (CI runs them after make test).
test-slow: setup
	CUDA_VISIBLE_DEVICES= $(PY) -m pytest -x -q -n 2 --dist loadgroup --durations=15 -m "slow and not gpu" tests

test-fast: setup
	CUDA_VISIBLE_DEVICES= $(PY) -m pytest -x -q -m "not multiproc and not gpu and not slow" tests

# On a CUDA machine: the GPU-marked tests (Transformer Engine, bf16, NCCL, the server on
# the device). EE_GPU_TESTS_ON_CPU=1 runs the same tests on CPU with TE's stand-in layout.
test-gpu: setup
	$(PY) -m pytest -x -q -m gpu -rs tests

# On a CUDA host: Transformer Engine and flash-attn, built against the installed torch (once;
# docs/gpu.md). make test-gpu then runs the TE and flash tests instead of skipping them.
GPU_STAMP := $(VENV)/.gpu-installed
setup-gpu: $(GPU_STAMP)

$(GPU_STAMP): $(STAMP) tools/setup_gpu.sh
	bash tools/setup_gpu.sh $(PY)
	touch $(GPU_STAMP)

# One command that measures a GPU (set-up, test-gpu, training and decoding speed, host syncs),
# each step under its own time limit, into runs/gpu_check/summary.json. Without CUDA it is a
# dry run with small shapes on CPU.
bench-gpu: setup
	$(PY) benchmarks/gpu_check.py

# ruff, configured in pyproject.toml (line length 120). `make format` rewrites files in place.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .

demo: setup
	bash examples/ee_llm/quickstart_cpu.sh

clean:
	rm -rf $(VENV) build *.egg-info
