# One command to set up, one to test, one to run the main job.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo clean

setup: $(STAMP)

$(STAMP): setup.py
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python 3.11 is required; set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	# The CPU wheel of PyTorch when there is no GPU (pip finds it in the local wheel folder).
	@if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install torch; else $(PY) -m pip install torch==2.13.0; fi
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -x -q tests

test-fast: setup
	$(PY) -m pytest -x -q -m "not multiproc" tests

demo: setup
	bash examples/ee_llm/quickstart_cpu.sh

clean:
	rm -rf $(VENV) build *.egg-info
