"""EE-Tuning, stage 1: give a trained checkpoint new exit heads (stage 2 is training
them with `--finetune --tune-exit`, the backbone frozen).

The checkpoint's model description (ModelConfig) rebuilds the backbone; the exits given
here (EarlyExitConfig's fields by name) replace its exits. Backbone tensors are read straight into
the new model (one model in memory).
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

import dataclasses
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from megatron.early_exit.config import EarlyExitConfig
from megatron.early_exit.hf import files
from megatron.early_exit.hf.convert import require_single_process_layout, stored_flags, training_model
from megatron.early_exit.hf.errors import ConversionError
from megatron.early_exit.models.model_config import ModelConfig, TokenizerConfig

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


def add_exits(
    load: str,
    save: str,
    exits: Optional[Dict[str, object]] = None,
    copy_init: bool = True,
    seed: Optional[int] = None,
    init_method_std: Optional[float] = None,
    iteration: Optional[int] = None,
    exits_from: Optional[str] = None,
) -> AddExitsReport:
    """Write checkpoint `load` with the exits described by `exits` (EarlyExitConfig's
    fields as keys, e.g. {"exit_layer_nums": [2, 4], "use_exit_norm": True}) to `save`.

    `exits_from`: take the exits, structure and weights, from that checkpoint instead
    (EE-Tuning's last step after --tune-exit-pipeline-parallel-size, whose checkpoint holds
    only the first pipeline stages: their tuned exits go back on the whole model)."""
    from megatron.early_exit.checkpoint import reader, writer

    files.require_new_output(save)
    require_single_process_layout()
    new_exits, source = _exit_settings(exits, exits_from)
    path = reader.resolve(load, iteration)
    saved = reader.read_common(path)["args"]
    old = reader.read_model_config(path)
    if init_method_std is not None:
        old = dataclasses.replace(old, init_method_std=init_method_std)
    config = dataclasses.replace(old, early_exit=new_exits)  # exits are replaced whole
    structure_kept = not old.early_exit.structure_differences(new_exits)
    kept = [n for n in config.exit_layer_nums if n in old.exit_layer_nums and structure_kept]
    if source is not None:
        _require_same_backbone(reader.read_model_config(source), config, exits_from)
        kept = []

    seed = saved.get("seed", 1234) if seed is None else seed
    model = training_model(config, seed=seed)  # new exits start from the random initialisation
    reader.load_weights(path, model, skip_exits=tuple(n for n in config.exit_layer_nums if n not in kept))
    report = AddExitsReport(os.path.abspath(save), kept=kept)
    initialised = [n for n in config.exit_layer_nums if n not in kept]
    if source is not None:
        _load_exits(model, source)
        report.initialised = {n: f"from {exits_from}" for n in initialised}
    else:
        report.initialised = {n: "copy" if copy_init else "random" for n in initialised}
        if copy_init:
            report.sources = _copy_exits(
                model, initialised, config.num_layers, config.untie_embeddings_and_output_weights
            )

    # The checkpoint keeps the layout it was written for, and the flags it was trained with.
    with files.atomic_output_dir(save) as tmp:
        tokenizer = _carry_tokenizer(load, config.tokenizer, tmp)
        model.model_config = dataclasses.replace(config, tokenizer=tokenizer)  # stored relative to the checkpoint
        flags = stored_flags(
            dataclasses.replace(config, tokenizer=tokenizer.relative_to(tmp).resolved(report.path)),
            saved.get("tensor_model_parallel_size", 1),
            saved.get("pipeline_model_parallel_size", 1),
            base={**saved, "seed": seed},
        )
        writer.save_weights(tmp, flags, model, iteration=0)
    return report


def _exit_settings(
    exits: Optional[Dict[str, object]], exits_from: Optional[str]
) -> Tuple[EarlyExitConfig, Optional[str]]:
    """(the new exits, checkpoint directory to read exit weights from or None)."""
    from megatron.early_exit.checkpoint import reader

    exits = {key: value for key, value in (exits or {}).items() if value is not None and value is not False}
    known = EarlyExitConfig.flag_names()
    unknown = sorted(set(exits) - set(known))
    if unknown:
        raise ConversionError(f"unknown exit settings {unknown} (known: {', '.join(known)})")
    if exits_from is not None:
        if exits:
            given = ", ".join("--" + k.replace("_", "-") for k in sorted(exits))
            raise ConversionError(f"--exits-from {exits_from} brings its own exits: drop {given}")
        source = reader.resolve(exits_from)
        return reader.read_model_config(source).early_exit, source
    if not exits.get("exit_layer_nums"):
        raise ConversionError("--exit-layer-nums: give at least one exit layer")
    return EarlyExitConfig(**exits), None


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
            raise ConversionError(
                f"cannot copy {source} {tuple(params[source].shape)} into {name} {tuple(param.shape)}"
            )
        param.copy_(params[source])
        sources[name] = source
    return sources


def _carry_tokenizer(load: str, tokenizer: TokenizerConfig, tmp: str) -> TokenizerConfig:
    """Tokenizer files kept inside the source checkpoint (as convert_hf.py writes them) are
    copied along to the same place in `tmp`, so that the new checkpoint stands on its own;
    returns the tokenizer with those files in `tmp`."""
    root = os.path.abspath(load)

    def inside(path: Optional[str]) -> bool:
        return path is not None and os.path.abspath(path).startswith(root + os.sep)

    def target(path: str) -> str:
        return os.path.join(tmp, os.path.relpath(os.path.abspath(path), root))

    source = files.tokenizer_source_dir(tokenizer.type, tokenizer.model)
    if inside(source) and os.path.isdir(source):  # the whole directory (transformers' side files too)
        shutil.copytree(source, target(source))
    moved = {}
    for key in ("model", "vocab_file", "merge_file"):
        path = getattr(tokenizer, key)
        if not inside(path) or not os.path.exists(path):
            continue
        if not os.path.exists(target(path)):
            os.makedirs(os.path.dirname(target(path)), exist_ok=True)
            (shutil.copytree if os.path.isdir(path) else shutil.copy2)(path, target(path))
        moved[key] = target(path)
    return dataclasses.replace(tokenizer, **moved)


def _require_same_backbone(source: ModelConfig, config: ModelConfig, exits_from: str) -> None:
    """The exits' checkpoint must share the backbone's shape (it may hold fewer layers)."""
    if source.num_layers > config.num_layers:
        different = [f"--num-layers: checkpoint {source.num_layers}, now {config.num_layers}"]
    else:
        same_depth = dataclasses.replace(source, num_layers=config.num_layers, first_stages_only=False)
        different = same_depth.architecture_differences(config)
    if different:
        raise ConversionError(
            f"--exits-from {exits_from} was trained on another model (checkpoint: --exits-from, "
            f"now: --load): {'; '.join(different)}"
        )


def _load_exits(model, source: str) -> None:
    """Read every exit tensor of `model` from checkpoint directory `source`."""
    from megatron.early_exit.checkpoint.errors import CheckpointError
    from megatron.early_exit.checkpoint.reader import model_sharded_state, read_sharded

    state = {k: v for k, v in model_sharded_state(model).items() if k.startswith("exits.")}
    try:
        # Tolerates `_extra_state` entries one module layout has and the other lacks.
        loaded = read_sharded(state, source, flag="--exits-from")
    except CheckpointError as err:
        raise ConversionError(str(err)) from err
    model.load_state_dict(loaded, strict=False)
