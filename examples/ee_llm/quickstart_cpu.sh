#!/usr/bin/env bash
# Quick start on CPU. Until the training entry point lands this is a smoke check:
# it builds a small early-exit-ready GPT on megatron-core under torchrun (TP=2, gloo)
# and runs forward and backward.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 \
  tests/multiproc/runner.py tests.multiproc.cases_foundation "$(mktemp -d)/smoke.json" case_tp2_equals_tp1
