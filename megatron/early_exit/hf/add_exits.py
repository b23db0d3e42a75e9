"""EE-Tuning, stage 1: give a trained checkpoint new exit heads (stage 2 is training
them with `--finetune --tune-exit`, the backbone frozen).

The checkpoint's stored flags rebuild the backbone; the exit flags given here replace its
exits. Backbone tensors are read straight into the new model (one model in memory).
An exit that already exists at the same layer with the same structure keeps its
weights; every other exit is initialised:

  copy (EE-Tuning)  norm          <- the final norm
                    output layer  <- the final output layer (untied exits; the word
                                     embedding when the model ties its output layer)
                    MLP           <- its own layer's MLP
                    block         <- the last transformer layer
  random            build_model's layout-invariant initialisation (seed, init std)

With copy-init, an exit after layer L first predicts what the model's own final norm and
output layer make of layer L's output (plus the copied MLP or block).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from megatron.early_exit.hf import files
from megatron.early_exit.hf.convert import require_single_process_layout, training_model
from megatron.early_exit.hf.errors import ConversionError

EXIT_FLAGS = ("exit_layer_nums", "exit_layer_weight", "exit_layer_temperature", "use_exit_norm", "use_exit_mlp",
              "use_exit_block", "untie_exit_output_weights", "pre_exit")
STRUCTURE = ("use_exit_norm", "use_exit_mlp", "use_exit_block", "untie_exit_output_weights", "pre_exit")
_EXIT_PARAM = re.compile(r"^exits\.(\d+)\.(norm|mlp|block|output_layer)\.(.+)$")


@dataclass
class AddExitsReport:
    path: str
    kept: List[int] = field(default_factory=list)
    initialised: Dict[int, str] = field(default_factory=dict)  # exit layer -> "copy" or "random"
    sources: Dict[str, str] = field(default_factory=dict)  # exit parameter -> the parameter it copies


def copy_source(name: str, num_layers: int, untied_model: bool) -> str:
    """The backbone parameter an exit parameter is copied from."""
    match = _EXIT_PARAM.match(name)
    if not match:
        raise ConversionError(f"exit parameter {name} has no copy source")
    layer, slot, rest = int(match.group(1)), match.group(2), match.group(3)
    if slot == "norm":
        return f"decoder.final_layernorm.{rest}"
    if slot == "mlp":
        return f"decoder.layers.{layer - 1}.mlp.{rest}"
    if slot == "block":
        return f"decoder.layers.{num_layers - 1}.{rest}"
    return "output_layer.weight" if untied_model else "embedding.word_embeddings.weight"


def _same_structure(old, new) -> bool:
    return all(getattr(old, key) == getattr(new, key) for key in STRUCTURE)


def add_exits(load: str, save: str, exits: Optional[Dict[str, object]] = None, copy_init: bool = True,
              seed: Optional[int] = None, init_method_std: Optional[float] = None, iteration: Optional[int] = None,
              exits_from: Optional[str] = None) -> AddExitsReport:
    """Write checkpoint `load` with the exits described by `exits` (our flag names as
    keys, e.g. {"exit_layer_nums": [2, 4], "use_exit_norm": True}) to `save`.

    `exits_from`: take the exits, structure and weights, from that checkpoint instead
    (EE-Tuning's last step after --tune-exit-pipeline-parallel-size, whose checkpoint holds
    only the first pipeline stages: their tuned exits go back on the whole model)."""
    from megatron.early_exit.inference.loading import stored_args
    from megatron.early_exit.training import checkpointing
    from megatron.early_exit.training.arguments import build_early_exit_config

    files.require_new_output(save)
    require_single_process_layout()
    exits, source = _exit_settings(exits, exits_from)
    path = checkpointing.resolve(load, iteration)
    saved = checkpointing.read_common(path)["args"]
    args = stored_args(path, 1)
    old = args.ee_config
    for key in EXIT_FLAGS:  # exits are replaced whole: unset lists fall back to their defaults
        setattr(args, key, exits.get(key, False if key in STRUCTURE else None))
    args.exit_layer_nums = list(args.exit_layer_nums or [])
    if not args.exit_layer_nums:
        raise ConversionError("--exit-layer-nums: give at least one exit layer")
    if seed is not None:
        args.seed = seed
    if init_method_std is not None:
        args.init_method_std = init_method_std
    args.ee_config = build_early_exit_config(args)
    args.ee_config.validate_against(args.num_layers)
    kept = [n for n in args.exit_layer_nums if n in old.exit_layer_nums and _same_structure(old, args.ee_config)]
    if source is not None:
        _require_same_backbone(checkpointing.read_common(source)["args"], saved, exits_from)
        kept = []

    model = training_model(args, _vocab_size(path))  # new exits start from the random initialisation
    checkpointing.load_weights(path, model, skip_exits=tuple(n for n in args.exit_layer_nums if n not in kept))
    report = AddExitsReport(os.path.abspath(save), kept=kept)
    new_exits = [n for n in args.exit_layer_nums if n not in kept]
    if source is not None:
        _load_exits(model, source)
        report.initialised = {n: f"from {exits_from}" for n in new_exits}
    else:
        report.initialised = {n: "copy" if copy_init else "random" for n in new_exits}
        if copy_init:
            report.sources = _copy_exits(model, new_exits, args.num_layers, args.untie_embeddings_and_output_weights)

    # The checkpoint keeps the layout it was written for.
    out_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "saved_tensor_model_parallel_size"})
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "sequence_parallel"):
        if key in saved:
            setattr(out_args, key, saved[key])
    with files.atomic_output_dir(save) as tmp:
        _carry_tokenizer(load, out_args, tmp, report.path)
        checkpointing.save_weights(tmp, out_args, model, iteration=0)
    return report


def _exit_settings(exits: Optional[Dict[str, object]], exits_from: Optional[str]):
    """(exit flags, checkpoint directory to read exit weights from or None)."""
    from megatron.early_exit.training import checkpointing

    exits = {key: value for key, value in (exits or {}).items() if value is not None and value is not False}
    unknown = sorted(set(exits) - set(EXIT_FLAGS))
    if unknown:
        raise ConversionError(f"unknown exit settings {unknown} (known: {', '.join(EXIT_FLAGS)})")
    if exits_from is None:
        return exits, None
    if exits:
        given = ", ".join("--" + k.replace("_", "-") for k in sorted(exits))
        raise ConversionError(f"--exits-from {exits_from} brings its own exits: drop {given}")
    source = checkpointing.resolve(exits_from)
    stored = checkpointing.read_common(source)["args"]
    return {key: stored.get(key) for key in EXIT_FLAGS if stored.get(key) not in (None, False)}, source


@torch.no_grad()
def _copy_exits(model, layers: List[int], num_layers: int, untied_model: bool) -> Dict[str, str]:
    """Copy-initialise the exits at `layers`; returns {exit parameter: its source}."""
    params = dict(model.named_parameters())
    sources = {}
    for name, param in params.items():
        match = _EXIT_PARAM.match(name)
        if not match or int(match.group(1)) not in layers:
            continue
        source = copy_source(name, num_layers, untied_model)
        if params[source].shape != param.shape:
            raise ConversionError(f"cannot copy {source} {tuple(params[source].shape)} into {name} {tuple(param.shape)}")
        param.copy_(params[source])
        sources[name] = source
    return sources


def _carry_tokenizer(load: str, args, tmp: str, final: str) -> None:
    """A tokenizer kept inside the source checkpoint (as convert_hf.py writes it) is copied
    along, so that the new checkpoint stands on its own."""
    source = files.tokenizer_source_dir(args.tokenizer_type, args.tokenizer_model)
    root = os.path.abspath(load)
    if source is None or not os.path.abspath(source).startswith(root + os.sep) or not os.path.isdir(source):
        return
    relative = os.path.relpath(os.path.abspath(source), root)
    shutil.copytree(source, os.path.join(tmp, relative))
    args.tokenizer_model = os.path.join(final, os.path.relpath(os.path.abspath(args.tokenizer_model), root))


def _vocab_size(path: str) -> int:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_tensors_metadata(path)["embedding.word_embeddings.weight"].global_shape[0]


def _require_same_backbone(source_args: dict, args: dict, exits_from: str) -> None:
    """The exits' checkpoint must share the backbone's shape (it may hold fewer layers)."""
    from megatron.early_exit.training.checkpointing import ARCHITECTURE_ARGS

    different = [f"--{k.replace('_', '-')} {source_args.get(k)!r} (the model has {args.get(k)!r})"
                 for k in ARCHITECTURE_ARGS if k != "num_layers" and source_args.get(k) != args.get(k)]
    if source_args.get("num_layers", 0) > args.get("num_layers", 0):
        different.append(f"--num-layers {source_args['num_layers']} (the model has {args['num_layers']})")
    if different:
        raise ConversionError(f"--exits-from {exits_from} was trained on another model: {'; '.join(different)}")


def _load_exits(model, source: str) -> None:
    """Read every exit tensor of `model` from checkpoint directory `source`."""
    from megatron.early_exit.training.checkpointing import CheckpointError, model_sharded_state, read_sharded

    state = {k: v for k, v in model_sharded_state(model).items() if k.startswith("exits.")}
    try:
        # Tolerates `_extra_state` entries one module layout has and the other lacks.
        loaded = read_sharded(state, source, flag="--exits-from")
    except CheckpointError as err:
        raise ConversionError(str(err)) from err
    model.load_state_dict(loaded, strict=False)
