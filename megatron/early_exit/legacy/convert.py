"""A legacy Megatron-LM / EE-LLM checkpoint (any TP and PP) -> our checkpoint.

  1. files.py finds the rank files and reads rank 0's `args` (no code runs)
  2. args.py turns them into our ModelConfig (EE-LLM's exit flags are ours)
  3. the model is built once at TP=PP=1 on CPU (our format is layout-independent)
  4. stage by stage, the TP ranks' tensors are renamed and joined (keymap.py) into its
     parameters; a tensor without a place, or a parameter without a tensor, stops it
  5. weights are saved with save_weights into a temporary directory, renamed when complete
Optimizer and RNG states are not converted. A checkpoint of EE-LLM's exit tuning on the first k
pipeline stages (only those saved) becomes one of those layers (ModelConfig.first_stages_only),
whose exits add_exits.py --exits-from puts back on the whole model.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from megatron.early_exit.hf.errors import ConversionError
from megatron.early_exit.legacy.args import legacy_flags, model_config
from megatron.early_exit.legacy.files import find_checkpoint, read_rank_file
from megatron.early_exit.legacy.keymap import IGNORED, join_shards, legacy_target, qkv_in_version_3
from megatron.early_exit.models.model_config import DTYPES, ModelConfig, TokenizerConfig


@dataclass
class LegacyResult:
    path: str
    config: ModelConfig
    source_layout: Tuple[int, int]  # (TP, PP) of the legacy checkpoint
    iteration: object  # the legacy iteration, or "release"
    model_flags: List[str]  # training flags that rebuild this model


def _flatten(tree: dict, prefix: str = "") -> Dict[str, object]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _stage_tensors(state: dict, path: str) -> Dict[str, torch.Tensor]:
    if any(re.fullmatch(r"model\d+", k) for k in state):
        raise ConversionError(f"{path}: holds model0, model1, ... (the interleaved pipeline), which is not supported")
    flat = _flatten(state["model"])
    return {re.sub(r"^language_model\.", "", k): v for k, v in flat.items() if isinstance(v, torch.Tensor)}


def _stage_exits(config: ModelConfig, stage: int, pp: int) -> List[int]:
    per_stage = config.num_layers // pp
    return [n for n in config.exit_layer_nums if stage * per_stage < n <= (stage + 1) * per_stage]


def _fill_stage(
    params: Dict[str, torch.Tensor],
    ranks: List[Dict[str, torch.Tensor]],
    files: List[str],
    stage: int,
    pp: int,
    config: ModelConfig,
    version: float,
    filled: set,
) -> None:
    """Copy one pipeline stage (its TP ranks' tensors) into our parameters."""
    exits, first = _stage_exits(config, stage, pp), stage * (config.num_layers // pp)
    tp = len(ranks)
    head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
    for key in ranks[0]:
        if IGNORED.search(key):
            continue
        target = legacy_target(key, first, exits)
        if target is None or target.name not in params:
            raise ConversionError(f"{files[0]}: tensor {key} has no place in the model its args describe")
        missing = [f for f, r in zip(files, ranks) if key not in r]
        if missing:
            raise ConversionError(f"{missing[0]}: tensor {key} is missing (other tensor-parallel ranks hold it)")
        shards = [r[key] for r in ranks]
        if target.kind == "qkv":
            if version < 2 and config.num_query_groups is not None:
                raise ConversionError(f"{files[0]}: checkpoint_version {version} with grouped-query attention")
            shards = [qkv_in_version_3(s, version, config.num_attention_heads // tp, head_dim) for s in shards]
        whole = join_shards(("glu" if config.swiglu else "col") if target.kind == "fc1" else target.kind, shards)
        param = params[target.name]
        if tuple(whole.shape) != tuple(param.shape):
            raise ConversionError(
                f"{files[0]}: tensor {key} joins to {tuple(whole.shape)} over TP={tp}, "
                f"the model's {target.name} is {tuple(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(whole)
        filled.add(target.name)


def convert_legacy(
    load: str,
    save: str,
    iteration: Optional[int] = None,
    dtype: str = "auto",
    tokenizer: TokenizerConfig = TokenizerConfig(),
    progress: bool = True,
) -> LegacyResult:
    """Convert the Megatron-LM / EE-LLM checkpoint under `load` (any TP and PP) into our
    checkpoint at `save`. `dtype`: fp32, bf16, fp16, or auto (the run's)."""
    from megatron.early_exit.checkpoint.writer import save_weights
    from megatron.early_exit.hf import files
    from megatron.early_exit.hf.convert import command_line_flags, stored_flags, training_model

    files.require_new_output(save)
    found = find_checkpoint(load, iteration)
    tp, pp = found.tensor_model_parallel_size, found.pipeline_model_parallel_size
    config, seed, version = _description(found, dtype, tokenizer)
    with files.atomic_output_dir(save) as tmp:
        model = training_model(config, seed=seed)
        params, filled = dict(model.named_parameters()), set()
        for stage in range(pp):
            names = [found.rank_file(t, stage) for t in range(tp)]
            if progress:
                print(f" stage {stage + 1}/{pp}: reading {tp} tensor-parallel file(s) of {found.directory}", flush=True)
            ranks = [_stage_tensors(read_rank_file(n), n) for n in names]
            _fill_stage(params, ranks, names, stage, pp, config, version, filled)
            del ranks
        _require_filled(params, filled, config, found.directory)
        save_weights(tmp, stored_flags(config, tp, pp, base={"seed": seed}), model, iteration=0)
    tag = os.path.basename(found.directory)
    return LegacyResult(
        os.path.abspath(save),
        config,
        (tp, pp),
        "release" if tag == "release" else int(tag[5:]),
        command_line_flags(config),
    )


def _description(found, dtype: str, tokenizer: TokenizerConfig) -> Tuple[ModelConfig, int, float]:
    """(our model description, the run's seed, checkpoint_version) from rank 0's file."""
    source = found.rank_file(0, 0)
    first = read_rank_file(source)
    args = first["args"]
    flags = legacy_flags(args, source)
    flags["num_layers"] = _layers_held(
        args, found.tensor_model_parallel_size, found.pipeline_model_parallel_size, found.directory
    )
    padded = (
        getattr(args, "padded_vocab_size", None) or _embedding_rows(first, source) * found.tensor_model_parallel_size
    )
    params_dtype = flags["params_dtype"] if dtype == "auto" else dtype
    if params_dtype not in DTYPES:
        raise ConversionError(f"--target-dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    config = model_config(
        flags, padded, tokenizer, params_dtype, source, first_stages_only=flags["num_layers"] < args.num_layers
    )
    return config, flags["seed"], float(first.get("checkpoint_version", 0))


def _layers_held(args: argparse.Namespace, tp: int, pp: int, directory: str) -> int:
    """Layers the files hold: all, or with EE-LLM's exit tuning on the first k pipeline stages
    (--tune-exit-pipeline-parallel-size k, which saves only those stages) the first L*k/PP."""
    stored_tp, stored_pp = (
        getattr(args, "tensor_model_parallel_size", tp),
        getattr(args, "pipeline_model_parallel_size", pp),
    )
    if args.num_layers % stored_pp:
        raise ConversionError(f"{directory}: args.num_layers {args.num_layers} does not split over PP={stored_pp}")
    if stored_tp == tp and stored_pp == pp:
        return args.num_layers
    if (
        stored_tp == tp
        and getattr(args, "tune_exit", False)
        and getattr(args, "tune_exit_pipeline_parallel_size", None) == pp
    ):
        return args.num_layers // stored_pp * pp
    raise ConversionError(f"{directory}: its args say TP={stored_tp} PP={stored_pp}, its files are TP={tp} PP={pp}")


def _require_filled(params: Dict[str, torch.Tensor], filled: set, config: ModelConfig, directory: str) -> None:
    """Every parameter came from the files; the first stages of a deeper model (exit tuning)
    have no final norm and output layer of their own, which keep their initialisation."""
    missing = sorted(set(params) - filled)
    if config.first_stages_only:
        missing = [n for n in missing if not n.startswith(("decoder.final_layernorm.", "output_layer."))]
    if missing:
        raise ConversionError(
            f"{directory}: no tensor for {', '.join(missing[:3])}"
            + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else "")
        )


def _embedding_rows(state: dict, source: str) -> int:
    tensors = _stage_tensors(state, source)
    if "embedding.word_embeddings.weight" not in tensors:
        raise ConversionError(f"{source}: no args.padded_vocab_size and no word embedding")
    return tensors["embedding.word_embeddings.weight"].shape[0]
