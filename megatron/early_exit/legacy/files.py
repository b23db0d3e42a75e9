"""The files of a legacy Megatron-LM / EE-LLM checkpoint, found and read without running code.

    DIR/latest_checkpointed_iteration.txt        an iteration number, or `release`
    DIR/iter_0000100/ or DIR/release/
        mp_rank_TT/model_optim_rng.pt            PP=1 (TT: tensor-parallel rank)
        mp_rank_TT_PPP/model_optim_rng.pt        PP>1 (PPP: pipeline stage)

(Megatron-LM `megatron/checkpointing.py`: get_checkpoint_name, read_metadata.) Each file is a
torch.save'd dict: `args` (the run's argparse.Namespace), `checkpoint_version`, `iteration`,
`model`, and optimizer, scheduler and RNG states. The pickles are read with torch's
weights_only loader (`checkpoint/safe_pickle.py`'s `torch_load`), allowing only what these files hold
besides tensors and containers: argparse.Namespace, the enums Megatron-LM keeps in `args`
(megatron-core's own; those of releases not installed as inert `LegacyEnum` values) and the
numpy arrays of the RNG states. Any other global is refused by name, never called.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
from dataclasses import dataclass
from typing import List, Optional

import torch

from megatron.early_exit.checkpoint.safe_pickle import torch_load
from megatron.early_exit.hf.errors import ConversionError

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


@dataclass(frozen=True)
class LegacyEnum:
    """An enum member of a Megatron-LM release kept in `args` (ModelType, AttnMaskType, ...),
    by name and value: its module, which is not installed, is never imported."""

    enum: str
    value: object


# Enums Megatron-LM keeps in `args` (model_type, attention masks and backends): those of
# megatron.model (2023, EE-LLM) and megatron.legacy.model as LegacyEnum, megatron-core's own.
_LEGACY_ENUMS = [
    f"{module}.{name}"
    for module in ("megatron.model.enums", "megatron.legacy.model.enums")
    for name in ("ModelType", "AttnMaskType", "AttnType", "LayerType", "PositionEmbeddingType")
]


def _legacy_globals() -> list:
    """What these files hold besides tensors and containers. megatron-core registers the
    same numpy and enum classes for its own checkpoints (megatron/core/safe_globals.py)."""
    import numpy

    try:
        from numpy._core.multiarray import _reconstruct  # numpy 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    from megatron.core import enums
    from megatron.core.transformer import enums as transformer_enums

    real = [
        argparse.Namespace,
        enums.ModelType,
        transformer_enums.AttnMaskType,
        transformer_enums.AttnType,
        transformer_enums.LayerType,
        transformer_enums.AttnBackend,
        # the numpy arrays of np.random.get_state() in the RNG states (uint32)
        numpy.ndarray,
        numpy.dtype,
        type(numpy.dtype("uint32")),
    ]
    numpy_names = [(_reconstruct, f"{module}.multiarray._reconstruct") for module in ("numpy.core", "numpy._core")]
    return real + numpy_names + [(functools.partial(LegacyEnum, name), name) for name in _LEGACY_ENUMS]


def read_rank_file(path: str) -> dict:
    """One `model_optim_rng.pt`, through torch's weights_only loader and the globals above."""
    with torch.serialization.safe_globals(_legacy_globals()):
        state = torch_load(path, path)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ConversionError(f"{path}: not a Megatron-LM checkpoint file (no `model` dict)")
    if not isinstance(state.get("args"), argparse.Namespace):
        raise ConversionError(
            f"{path}: holds no `args` (written before Megatron-LM stored them); cannot tell the model"
        )
    return state


# -- finding the files -------------------------------------------------------------------


@dataclass
class LegacyCheckpoint:
    directory: str  # iter_NNNNNNN or release
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    staged: bool  # the rank directories name their pipeline stage (mp_rank_TT_PPP)

    def rank_file(self, tp_rank: int, pp_rank: int) -> str:
        name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if self.staged else "")
        return os.path.join(self.directory, name, RANK_FILE)


def find_checkpoint(root: str, iteration: Optional[int] = None) -> LegacyCheckpoint:
    """The checkpoint under `root` (the latest, or `iteration`), or `root` itself when it is
    an iter_*/release directory; its TP and PP sizes from the rank directories."""
    directory = root
    if not any(_RANK_DIR.match(n) for n in _listdir(root)):
        directory = os.path.join(root, _iteration_dir(root, iteration))
    ranks = [m for m in map(_RANK_DIR.match, _listdir(directory)) if m]
    if not ranks:
        extra = (
            " (a torch_dist checkpoint: Megatron-LM's newer format, not read here)"
            if os.path.isfile(os.path.join(directory, ".metadata"))
            else ""
        )
        raise ConversionError(f"{directory}: no mp_rank_* directories{extra}")
    if len({m.group(2) is None for m in ranks}) > 1:
        raise ConversionError(f"{directory}: mixes mp_rank_TT and mp_rank_TT_PPP directories")
    found = LegacyCheckpoint(
        directory,
        max(int(m.group(1)) for m in ranks) + 1,
        max(int(m.group(2) or 0) for m in ranks) + 1,
        ranks[0].group(2) is not None,
    )
    tp = found.tensor_model_parallel_size
    for t in range(tp):
        for p in range(found.pipeline_model_parallel_size):
            if not os.path.isfile(found.rank_file(t, p)):
                raise ConversionError(
                    f"{found.rank_file(t, p)} is missing (TP={tp}, PP={found.pipeline_model_parallel_size})"
                )
    return found


def _listdir(path: str) -> List[str]:
    if not os.path.isdir(path):
        raise ConversionError(f"{path} is not a directory")
    return sorted(os.listdir(path))


def _iteration_dir(root: str, iteration: Optional[int]) -> str:
    if iteration is not None:
        return f"iter_{iteration:07d}"
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        raise ConversionError(f"{root}: no {TRACKER} and no mp_rank_* directories (not a Megatron-LM checkpoint)")
    text = open(tracker).read().strip()
    if text == "release":
        return "release"
    if not text.isdigit():
        raise ConversionError(f"{tracker} is corrupt ({text!r})")
    return f"iter_{int(text):07d}"
