"""The process environment through which megatron-core configures Transformer Engine's attention.

megatron-core 0.16.1 hands two attention settings to Transformer Engine through os.environ
only, and checks them at every model build:
- the backend: `LanguageModule.__init__` writes NVTE_FLASH_ATTN / NVTE_FUSED_ATTN /
  NVTE_UNFUSED_ATTN from `config.attention_backend` and asserts that any value already
  there is the one it would write. A second build with another backend in one process (a
  test session, a server with two models, a flash run after a default one) failed;
- query-key layer scaling: `TEDotProductAttention.__init__` raises ValueError unless
  NVTE_APPLY_QK_LAYER_SCALING equals `config.apply_query_key_layer_scaling`, and nothing
  set it (Megatron-LM's launchers export it from --apply-query-key-layer-scaling).

So each build sets both from its own config, as Megatron-LM's tests reset them between
builds: values a previous build in this process wrote are removed first (values the user
exported stay, and megatron-core still names a conflict with them). The variables are
process-wide: Transformer Engine reads the backend ones when it selects a backend.
"""

from __future__ import annotations

import os
from typing import Dict, List

BACKEND_VARIABLES = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")
QK_LAYER_SCALING_VARIABLE = "NVTE_APPLY_QK_LAYER_SCALING"

_written: Dict[str, str] = {}  # backend variables as the last build in this process left them


def prepare_attention_environment(config) -> List[str]:
    """Before megatron-core builds a model from `config`: drop the backend variables an
    earlier build wrote, set query-key layer scaling. Returns the backend variables the
    build will write (pass them to `record_attention_environment`)."""
    for name, value in list(_written.items()):
        if os.environ.get(name) == value:
            del os.environ[name]
        del _written[name]
    os.environ[QK_LAYER_SCALING_VARIABLE] = "1" if config.apply_query_key_layer_scaling else "0"
    return [name for name in BACKEND_VARIABLES if name not in os.environ]


def record_attention_environment(written_by_build: List[str]) -> None:
    """After the build: remember what it wrote, so that the next build may change it."""
    for name in written_by_build:
        if name in os.environ:
            _written[name] = os.environ[name]
