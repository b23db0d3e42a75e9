"""A Hugging Face Llama directory <-> our checkpoint, both ways, lossless.

`import_llama(hf_dir, out, tp, pp)`:
  1. config.json -> LlamaShape -> our flags (plus exit flags from an `early_exit`
     section), validated for the target layout and stored with the checkpoint
  2. the model is built once at TP=1 on CPU: the checkpoint format is layout-independent,
     the target TP/PP are recorded in the stored flags
  3. every parameter is filled from its Hugging Face tensors (key map, shapes asserted);
     a tensor left over means a Llama variant we do not know, and stops the conversion
  4. weights and tokenizer files go to a temporary directory, renamed when complete

`export_llama(checkpoint, out)`: the backbone as LlamaForCausalLM safetensors (sharded with
an index past `max_shard_bytes`), exit heads in `early_exit_heads.safetensors`, config.json
with an `early_exit` section, tokenizer files. Importing the export gives back the same tensors.

Both need a single-process layout (TP=PP=1); the tools start one.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from typing import List, Optional

import torch

from megatron.early_exit.hf import files
from megatron.early_exit.errors import ConfigError
from megatron.early_exit.hf.errors import ConversionError
from megatron.early_exit.hf.llama import (
    LlamaShape,
    exit_flags,
    exit_section,
    hf_config,
    hf_names,
    is_exit_name,
    model_flags,
    shape_from_args,
    shape_from_hf_config,
    to_hf,
    to_ours,
)

DTYPE_FLAGS = {"fp32": [], "bf16": ["--bf16"], "fp16": ["--fp16"]}
HF_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
TOKENIZER_SUBDIR = "tokenizer"
# Tensors a Llama checkpoint may carry that hold nothing to convert.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclass
class ImportResult:
    path: str
    shape: LlamaShape
    model_flags: List[str]  # what training needs to rebuild this model (shape, tokenizer, dtype, exits)


def require_single_process_layout() -> None:
    from megatron.core import parallel_state

    from megatron.early_exit.parallel import initialize_parallel

    if not parallel_state.model_parallel_is_initialized():
        initialize_parallel(1, 1)
    elif parallel_state.get_tensor_model_parallel_world_size() != 1 or parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise ConversionError("conversion runs at TP=PP=1 (the checkpoint format is layout-independent)")


def training_model(args: argparse.Namespace, vocab_size: int):
    """The model of `args` built on CPU at TP=PP=1, whatever layout `args` names."""
    from megatron.early_exit.training.trainer import build_model

    build_args = argparse.Namespace(**vars(args))
    build_args.tensor_model_parallel_size = build_args.pipeline_model_parallel_size = 1
    build_args.sequence_parallel = False
    return build_model(build_args, torch.device("cpu"), vocab_size)


def stored_flags(flags: List[str], tp: int, pp: int) -> argparse.Namespace:
    """Parse model flags into the namespace stored with a checkpoint (validated for the
    target layout; the training-only flags get placeholders)."""
    from megatron.early_exit.training.arguments import parse_args

    placeholders = ["--micro-batch-size", "1", "--train-iters", "1", "--lr", "0", "--mock-data"]
    layout = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    try:
        return parse_args(flags + layout + placeholders, world_size=tp * pp)
    except ConversionError:
        raise
    except ConfigError as err:
        raise ConversionError(f"{err} (target layout --target-tensor-parallel-size {tp} "
                              f"--target-pipeline-parallel-size {pp})") from None


# ----------------------------------------------------------------------------- HF -> ours


def _vocab_divisor(tokenizer_vocab: int, vocab_size: int, tp: int, source: str) -> int:
    """A --make-vocab-size-divisible-by that pads the tokenizer's vocabulary to exactly the
    model's (the smallest such power of two, else vocab/TP): no rows are added or dropped."""
    from megatron.early_exit.training.arguments import padded_vocab_size

    candidates = [2**i for i in range(8)] + ([vocab_size // tp] if vocab_size % tp == 0 else [])
    for d in candidates:
        if padded_vocab_size(tokenizer_vocab, argparse.Namespace(make_vocab_size_divisible_by=d, tensor_model_parallel_size=tp)) == vocab_size:
            return d
    raise ConversionError(
        f"{source}: vocab_size {vocab_size} cannot be laid out at --target-tensor-parallel-size {tp} for a tokenizer "
        f"of {tokenizer_vocab} tokens (the vocabulary must split evenly over tensor-parallel ranks)"
    )


def _tokenizer_flags(hf_dir: str, final_dir: str, vocab_size: int):
    """(tokenizer flags, its vocabulary size, whether there are tokenizer files to copy)."""
    from megatron.early_exit.training.tokenizers import HuggingFaceTokenizer, SentencePieceTokenizer

    target = os.path.join(final_dir, TOKENIZER_SUBDIR)
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        vocab = HuggingFaceTokenizer(hf_dir).vocab_size
        return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", target], vocab, True
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
        vocab = SentencePieceTokenizer(os.path.join(hf_dir, "tokenizer.model")).vocab_size
        return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", os.path.join(target, "tokenizer.model")], vocab, True
    return ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab_size)], vocab_size, False


@torch.no_grad()
def _fill_from_hf(model, weights: files.HFWeights, shape: LlamaShape, progress: bool) -> None:
    """Every parameter from its Hugging Face tensors; every tensor must find its place."""
    from tqdm import tqdm

    consumed = set()
    for name, param in tqdm(list(model.named_parameters()), desc="import", unit="tensor", disable=not progress):
        names = hf_names(name)
        param.copy_(to_ours(name, [(n, weights.get(n)) for n in names], shape, param.shape))
        consumed.update(names)
    ignored = {"lm_head.weight"} if shape.tie_word_embeddings else set()  # a tied copy some checkpoints keep
    leftover = sorted(k for k in weights.keys() if k not in consumed and k not in ignored and not _IGNORED.search(k))
    if leftover:
        raise ConversionError(
            f"{weights.directory}: {len(leftover)} tensors have no place in a Llama model, e.g. {', '.join(leftover[:3])}"
        )


def import_llama(hf_dir: str, out: str, target_tensor_parallel_size: int = 1, target_pipeline_parallel_size: int = 1,
                 dtype: str = "auto", progress: bool = True, transformer_impl: Optional[str] = None) -> ImportResult:
    """Convert a Hugging Face Llama directory into our checkpoint at `out`. The checkpoint
    is the same whatever `transformer_impl` builds the model in between (local on CPU)."""
    from megatron.early_exit.training import checkpointing

    tp, pp = target_tensor_parallel_size, target_pipeline_parallel_size
    files.require_new_output(out)
    config_path = os.path.join(hf_dir, "config.json")
    cfg = files.read_json(config_path)
    shape = shape_from_hf_config(cfg, config_path)
    section = cfg.get("early_exit")
    if section is not None and not isinstance(section, dict):
        raise ConversionError(f"{config_path}: early_exit must be an object, got {section!r}")
    weights = files.HFWeights(hf_dir, [section.get("weights_file", files.EXIT_WEIGHTS)] if section else [])
    if dtype == "auto":
        dtype = HF_DTYPE_NAMES[shape.dtype]
    if dtype not in DTYPE_FLAGS:
        raise ConversionError(f"--target-dtype {dtype!r}: choose auto, {', '.join(DTYPE_FLAGS)}")

    final = os.path.abspath(out)
    tok_flags, tok_vocab, has_tokenizer = _tokenizer_flags(hf_dir, final, shape.vocab_size)
    if tok_vocab > shape.vocab_size:
        raise ConversionError(f"{hf_dir}: the tokenizer has {tok_vocab} tokens but config.json's vocab_size is {shape.vocab_size}")
    flags = (model_flags(shape) + ["--make-vocab-size-divisible-by", str(_vocab_divisor(tok_vocab, shape.vocab_size, tp, config_path))]
             + tok_flags + DTYPE_FLAGS[dtype] + (exit_flags(section, config_path) if section else []))
    args = stored_flags(flags, tp, pp)
    args.padded_vocab_size = shape.vocab_size  # as training stores it
    args.transformer_impl = transformer_impl

    require_single_process_layout()
    with files.atomic_output_dir(out) as tmp:
        model = training_model(args, shape.vocab_size)
        _fill_from_hf(model, weights, shape, progress)
        checkpointing.save_weights(tmp, args, model, iteration=0)
        if has_tokenizer:
            files.copy_tokenizer_files(hf_dir, os.path.join(tmp, TOKENIZER_SUBDIR))
    return ImportResult(final, shape, flags)


# ----------------------------------------------------------------------------- ours -> HF


def parse_size(text) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ConversionError(f"--max-shard-size {text!r}: give bytes or a size like 5GB")
    units = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(match.group(1)) * units[(match.group(2) or "").upper()])


def _export_tokenizer(args, target: str) -> None:
    """Copy the checkpoint's tokenizer files, under the names transformers looks for."""
    import shutil

    if args.tokenizer_type == "GPT2BPETokenizer":
        shutil.copy2(args.vocab_file, os.path.join(target, "vocab.json"))
        shutil.copy2(args.merge_file, os.path.join(target, "merges.txt"))
        return
    source = files.tokenizer_source_dir(args.tokenizer_type, args.tokenizer_model)
    if source is None:  # NullTokenizer: ids are the text
        return
    files.copy_tokenizer_files(source, target)
    expected = {"HuggingFaceTokenizer": "tokenizer.json", "SentencePieceTokenizer": "tokenizer.model"}[args.tokenizer_type]
    if os.path.isfile(args.tokenizer_model) and os.path.basename(args.tokenizer_model) != expected:
        shutil.copy2(args.tokenizer_model, os.path.join(target, expected))


def _write_weights(directory: str, params, shards: List[List[str]], basename: str, shape: LlamaShape, bar) -> None:
    """Our parameters, shard by shard, as Hugging Face tensors (one shard in memory at a time)."""
    writer = files.ShardWriter(directory, len(shards), basename)
    for index, names in enumerate(shards):
        tensors = {}
        for name in names:
            tensors.update(to_hf(name, params[name], shape))
            bar.update()
        writer.write(index, tensors)
    writer.finish()


def export_llama(checkpoint: str, out: str, max_shard_bytes: int = 5 * 10**9, progress: bool = True,
                 iteration: Optional[int] = None, transformer_impl: Optional[str] = None) -> str:
    """Write our checkpoint as a Hugging Face Llama directory at `out` (the same files
    whatever `transformer_impl` reads it: the key map knows both layer layouts)."""
    import json

    from tqdm import tqdm

    from megatron.early_exit.inference.loading import load_model

    files.require_new_output(out)
    require_single_process_layout()
    model, tokenizer, args = load_model(checkpoint, 1, device=torch.device("cpu"), iteration=iteration,
                                        transformer_impl=transformer_impl)
    if args.tune_exit_pipeline_parallel_size is not None:
        raise ConversionError(
            f"{checkpoint} was saved by exit tuning with --tune-exit-pipeline-parallel-size and holds only the first "
            f"{args.num_layers} layers: put its exits back on the whole model first "
            "(tools/checkpoint/add_exits.py --load <whole model> --exits-from <this checkpoint>)"
        )
    shape = shape_from_args(args, model.vocab_size)
    params = {name: p.detach() for name, p in model.named_parameters()}
    backbone = [n for n in params if not is_exit_name(n)]
    has_exits = bool(args.ee_config.exit_layer_nums)  # (tied exits without a norm own no tensors)
    with files.atomic_output_dir(out) as tmp:
        with tqdm(total=len(params), desc="export", unit="tensor", disable=not progress) as bar:
            sizes = [(n, params[n].numel() * params[n].element_size()) for n in backbone]
            _write_weights(tmp, params, files.plan_shards(sizes, max_shard_bytes), "model", shape, bar)
            if has_exits:
                exits = [n for n in params if is_exit_name(n)]
                _write_weights(tmp, params, [exits], files.EXIT_WEIGHTS[: -len(".safetensors")], shape, bar)
        section = exit_section(args, files.EXIT_WEIGHTS) if has_exits else None
        cfg = hf_config(shape, getattr(tokenizer, "bos", None), tokenizer.eod, getattr(tokenizer, "pad", None), section)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        _export_tokenizer(args, tmp)
    return os.path.abspath(out)
