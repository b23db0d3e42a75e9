"""A Hugging Face directory of a Llama-family model (families.py) <-> our checkpoint,
both ways, lossless.

`import_hf(hf_dir, out, tp, pp)`:
  1. config.json -> HFShape -> our ModelConfig (exits from an `early_exit` section),
     validated for the target layout; the layout and the family are recorded in the
     stored flags
  2. the model is built once at TP=1 on CPU: the checkpoint format is layout-independent
  3. every parameter is filled from its Hugging Face tensors (key map, shapes asserted);
     a tensor left over means a variant we do not know, and stops the conversion
  4. weights and tokenizer files go to a temporary directory, renamed when complete; the
     checkpoint names its tokenizer relative to itself, so the output can be moved

`export_hf(checkpoint, out)`: the backbone as safetensors of its family's *ForCausalLM (the
family it was imported from, else the one its attention calls for; sharded with an index
past `max_shard_bytes`), exit heads in `early_exit_heads.safetensors`, config.json with an
`early_exit` section, tokenizer files. Importing the export gives back the same tensors;
`megatron.early_exit.hf.modeling` runs the exits in transformers.

Both need a single-process layout (TP=PP=1); the tools start one.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import List, Optional

import torch

from megatron.early_exit.config import EarlyExitConfig
from megatron.early_exit.hf import files
from megatron.early_exit.hf.errors import ConversionError
from megatron.early_exit.hf.families import FAMILIES
from megatron.early_exit.hf.mapping import (
    HFShape,
    exit_config,
    exit_section,
    hf_config,
    hf_names,
    is_exit_name,
    model_config,
    params_dtype_of,
    shape_from_hf_config,
    shape_from_model_config,
    to_hf,
    to_ours,
)
from megatron.early_exit.models.model_config import DTYPES, ModelConfig, TokenizerConfig, padded_vocab_size

TOKENIZER_SUBDIR = "tokenizer"
# Tensors a Llama checkpoint may carry that hold nothing to convert.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# The stored flag that remembers the family a checkpoint was imported from.
MODEL_TYPE_FLAG = "hf_model_type"


@dataclass
class ImportResult:
    path: str
    shape: HFShape
    config: ModelConfig  # as stored (tokenizer files inside `path`)
    model_flags: List[str]  # training flags that rebuild this model (shape, tokenizer, dtype, exits)


def require_single_process_layout() -> None:
    from megatron.core import parallel_state

    from megatron.early_exit.parallel import initialize_parallel

    if not parallel_state.model_parallel_is_initialized():
        initialize_parallel(1, 1)
    elif (
        parallel_state.get_tensor_model_parallel_world_size() != 1
        or parallel_state.get_pipeline_model_parallel_world_size() != 1
    ):
        raise ConversionError("conversion runs at TP=PP=1 (the checkpoint format is layout-independent)")


def training_model(config: ModelConfig, seed: int = 1234, transformer_impl: Optional[str] = None):
    """The model of `config` built on CPU at TP=PP=1, whatever layout it is stored for."""
    from megatron.early_exit.models.builder import build_model

    require_single_process_layout()
    return build_model(config, torch.device("cpu"), seed=seed, transformer_impl=transformer_impl)


def stored_flags(
    config: ModelConfig,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    base: Optional[dict] = None,
) -> dict:
    """The flags stored with a checkpoint written without a training run (--use-checkpoint-args
    and tools that rebuild a run read them): `base` (the flags of the checkpoint it was made
    from), the model's, its precision, and the layout it is meant for."""
    flags = dict(base or {})
    flags.update(config.to_flags())
    flags.setdefault("seq_length", config.max_position_embeddings)
    flags.setdefault("sequence_parallel", False)
    flags.update(
        padded_vocab_size=config.padded_vocab_size,
        bf16=config.params_dtype == "bf16",
        fp16=config.params_dtype == "fp16",
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
    )
    return flags


def _field_defaults(cls) -> dict:
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return defaults


def command_line_flags(config: ModelConfig) -> List[str]:
    """Training flags that rebuild this model: the values that differ from ModelConfig's
    and EarlyExitConfig's defaults, the sequence length and the precision."""
    defaults = {**_field_defaults(ModelConfig), **_field_defaults(EarlyExitConfig), "group_query_attention": False}
    flags = {**config.to_flags(), "seq_length": config.max_position_embeddings}
    out: List[str] = []
    for name, value in flags.items():
        if value is None or value is False or value == [] or (name in defaults and defaults[name] == value):
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            out += [flag] + [str(v) for v in value]
        else:
            out += [flag, str(value)]
    return out + ([] if config.params_dtype == "fp32" else ["--" + config.params_dtype])


# ----------------------------------------------------------------------------- HF -> ours


def _check_layout(config: ModelConfig, tp: int, pp: int) -> None:
    """What the target layout needs of the model (it is built at TP=PP=1 here)."""
    checks = [
        (
            tp >= 1 and pp >= 1,
            f"--tensor-model-parallel-size ({tp}) and --pipeline-model-parallel-size ({pp}) must be >= 1",
        ),
        (
            config.num_attention_heads % tp == 0,
            f"--num-attention-heads ({config.num_attention_heads}) is not divisible by --tensor-model-parallel-size "
            f"({tp})",
        ),
        (
            (config.num_query_groups or tp) % tp == 0,
            f"--num-query-groups ({config.num_query_groups}) is not divisible by --tensor-model-parallel-size ({tp})",
        ),
        (
            config.num_layers % pp == 0,
            f"--num-layers ({config.num_layers}) is not divisible by --pipeline-model-parallel-size ({pp})",
        ),
    ]
    for ok, problem in checks:
        if not ok:
            raise ConversionError(
                f"{problem} (target layout --target-tensor-parallel-size {tp} --target-pipeline-parallel-size {pp})"
            )


def _vocab_divisor(tokenizer_vocab: int, vocab_size: int, tp: int, source: str) -> int:
    """A --make-vocab-size-divisible-by that pads the tokenizer's vocabulary to exactly the
    model's (the smallest such power of two, else vocab/TP): no rows are added or dropped."""
    candidates = [2**i for i in range(8)] + ([vocab_size // tp] if vocab_size % tp == 0 else [])
    for d in candidates:
        if padded_vocab_size(tokenizer_vocab, d, tp) == vocab_size:
            return d
    raise ConversionError(
        f"{source}: vocab_size {vocab_size} cannot be laid out at --target-tensor-parallel-size {tp} for a tokenizer "
        f"of {tokenizer_vocab} tokens (the vocabulary must split evenly over tensor-parallel ranks)"
    )


def _tokenizer_config(hf_dir: str, vocab_size: int):
    """(the tokenizer, its files named relative to the output, its vocabulary size,
    whether there are tokenizer files to copy into TOKENIZER_SUBDIR)."""
    from megatron.early_exit.tokenizers import HuggingFaceTokenizer, SentencePieceTokenizer

    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        vocab = HuggingFaceTokenizer(hf_dir).vocab_size
        return TokenizerConfig("HuggingFaceTokenizer", model=TOKENIZER_SUBDIR), vocab, True
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
        vocab = SentencePieceTokenizer(os.path.join(hf_dir, "tokenizer.model")).vocab_size
        return (
            TokenizerConfig("SentencePieceTokenizer", model=os.path.join(TOKENIZER_SUBDIR, "tokenizer.model")),
            vocab,
            True,
        )
    return TokenizerConfig("NullTokenizer", vocab_size=vocab_size), vocab_size, False


def _target_dtype(dtype: str, shape: HFShape) -> str:
    if dtype == "auto":
        return params_dtype_of(shape.dtype)
    if dtype not in DTYPES:
        raise ConversionError(f"--target-dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    return dtype


def _check_config_against_weights(shape: HFShape, weights: files.HFWeights, source: str) -> None:
    """config.json's sizes against the shapes of the first and last layers' tensors (read
    from the file headers) before a model of that size is built: a config that does not
    describe the weights would otherwise try to allocate whatever it says."""
    hidden, hd, ffn = shape.hidden_size, shape.head_dim, shape.ffn_hidden_size
    expected = {"model.embed_tokens.weight": (shape.vocab_size, hidden), "model.norm.weight": (hidden,)}
    if not shape.tie_word_embeddings:
        expected["lm_head.weight"] = (shape.vocab_size, hidden)
    for i in sorted({0, shape.num_layers - 1}):
        layer = f"model.layers.{i}."
        expected.update(
            {
                layer + "self_attn.q_proj.weight": (shape.num_attention_heads * hd, hidden),
                layer + "self_attn.k_proj.weight": (shape.num_query_groups * hd, hidden),
                layer + "self_attn.o_proj.weight": (hidden, shape.num_attention_heads * hd),
                layer + "mlp.gate_proj.weight": (ffn, hidden),
                layer + "mlp.down_proj.weight": (hidden, ffn),
            }
        )
    for name, want in expected.items():
        if name not in weights:
            raise ConversionError(
                f"{source} does not match the weights: tensor {name} is missing from "
                f"{weights.directory} (num_hidden_layers {shape.num_layers})"
            )
        have = weights.shape(name)
        if have != want:
            raise ConversionError(
                f"{source} does not match the weights: tensor {name} has shape {have}, expected "
                f"{want} (hidden_size {hidden}, intermediate_size {ffn}, vocab_size {shape.vocab_size}, "
                f"heads {shape.num_attention_heads}/{shape.num_query_groups} of {hd})"
            )


@torch.no_grad()
def _fill_from_hf(model, weights: files.HFWeights, shape: HFShape, progress: bool) -> None:
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
            f"{weights.directory}: {len(leftover)} tensors have no place in a "
            f"{FAMILIES[shape.model_type].architecture} model, e.g. {', '.join(leftover[:3])}"
        )


def import_hf(
    hf_dir: str,
    out: str,
    target_tensor_parallel_size: int = 1,
    target_pipeline_parallel_size: int = 1,
    dtype: str = "auto",
    progress: bool = True,
    transformer_impl: Optional[str] = None,
) -> ImportResult:
    """Convert a Hugging Face directory into our checkpoint at `out`. The checkpoint
    is the same whatever `transformer_impl` builds the model in between (local on CPU)."""
    from megatron.early_exit.checkpoint.writer import save_weights

    tp, pp = target_tensor_parallel_size, target_pipeline_parallel_size
    files.require_new_output(out)
    config_path = os.path.join(hf_dir, "config.json")
    cfg = files.read_json(config_path)
    shape = shape_from_hf_config(cfg, config_path)
    section = cfg.get("early_exit")
    if section is not None and not isinstance(section, dict):
        raise ConversionError(f"{config_path}: early_exit must be an object, got {section!r}")
    weights = files.HFWeights(hf_dir, [section.get("weights_file", files.EXIT_WEIGHTS)] if section else [])
    _check_config_against_weights(shape, weights, config_path)
    params_dtype = _target_dtype(dtype, shape)

    final = os.path.abspath(out)
    tokenizer, tok_vocab, has_tokenizer = _tokenizer_config(hf_dir, shape.vocab_size)
    if tok_vocab > shape.vocab_size:
        raise ConversionError(
            f"{hf_dir}: the tokenizer has {tok_vocab} tokens but config.json's vocab_size is {shape.vocab_size}"
        )
    config = model_config(
        shape,
        _vocab_divisor(tok_vocab, shape.vocab_size, tp, config_path),
        tokenizer.resolved(final),
        params_dtype,
        exit_config(section, config_path) if section else None,
    )
    _check_layout(config, tp, pp)

    require_single_process_layout()
    with files.atomic_output_dir(out) as tmp:
        if has_tokenizer:
            files.copy_tokenizer_files(hf_dir, os.path.join(tmp, TOKENIZER_SUBDIR))
        # Built with the files where they are while it is written: stored relative to the checkpoint.
        model = training_model(
            dataclasses.replace(config, tokenizer=tokenizer.resolved(tmp)), transformer_impl=transformer_impl
        )
        _fill_from_hf(model, weights, shape, progress)
        flags = stored_flags(config, tp, pp, base={MODEL_TYPE_FLAG: shape.model_type})
        save_weights(tmp, flags, model, iteration=0)
    return ImportResult(final, shape, config, command_line_flags(config))


# ----------------------------------------------------------------------------- ours -> HF


def _imported_family(checkpoint: str, iteration: Optional[int]) -> Optional[str]:
    """The family the checkpoint was imported from (add_exits.py carries the flag along)."""
    from megatron.early_exit.checkpoint import reader

    args = reader.read_common(reader.resolve(checkpoint, iteration)).get("args") or {}
    return args.get(MODEL_TYPE_FLAG) if isinstance(args, dict) else getattr(args, MODEL_TYPE_FLAG, None)


def parse_size(text) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ConversionError(f"--max-shard-size {text!r}: give bytes or a size like 5GB")
    units = {
        "": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    return int(float(match.group(1)) * units[(match.group(2) or "").upper()])


def _export_tokenizer(tokenizer: TokenizerConfig, target: str) -> None:
    """Copy the checkpoint's tokenizer files, under the names transformers looks for."""
    import shutil

    if tokenizer.type == "GPT2BPETokenizer":
        shutil.copy2(tokenizer.vocab_file, os.path.join(target, "vocab.json"))
        shutil.copy2(tokenizer.merge_file, os.path.join(target, "merges.txt"))
        return
    source = files.tokenizer_source_dir(tokenizer.type, tokenizer.model)
    if source is None:  # NullTokenizer: ids are the text
        return
    files.copy_tokenizer_files(source, target)
    expected = {"HuggingFaceTokenizer": "tokenizer.json", "SentencePieceTokenizer": "tokenizer.model"}[tokenizer.type]
    if os.path.isfile(tokenizer.model) and os.path.basename(tokenizer.model) != expected:
        shutil.copy2(tokenizer.model, os.path.join(target, expected))


def _write_weights(directory: str, params, shards: List[List[str]], basename: str, shape: HFShape, bar) -> None:
    """Our parameters, shard by shard, as Hugging Face tensors (one shard in memory at a time)."""
    writer = files.ShardWriter(directory, len(shards), basename)
    for index, names in enumerate(shards):
        tensors = {}
        for name in names:
            tensors.update(to_hf(name, params[name], shape))
            bar.update()
        writer.write(index, tensors)
    writer.finish()


def export_hf(
    checkpoint: str,
    out: str,
    max_shard_bytes: int = 5 * 10**9,
    progress: bool = True,
    iteration: Optional[int] = None,
    transformer_impl: Optional[str] = None,
    model_type: Optional[str] = None,
) -> str:
    """Write our checkpoint as a Hugging Face directory at `out` (the same files whatever
    `transformer_impl` reads it: the key map knows both layer layouts). `model_type`: the
    family to write (None/"auto": the one it was imported from, else what its attention
    calls for: qwen3 for QK norm, qwen2 for QKV biases, else llama)."""
    import json

    from tqdm import tqdm

    from megatron.early_exit.inference.loading import load_model

    files.require_new_output(out)
    require_single_process_layout()
    model, tokenizer, config = load_model(
        checkpoint,
        1,
        device=torch.device("cpu"),
        iteration=iteration,
        transformer_impl=transformer_impl,
        runs_forward=False,
    )
    if config.first_stages_only:
        raise ConversionError(
            f"{checkpoint} was saved by exit tuning with --tune-exit-pipeline-parallel-size and holds only the first "
            f"{config.num_layers} layers: put its exits back on the whole model first "
            "(tools/checkpoint/add_exits.py --load <whole model> --exits-from <this checkpoint>)"
        )
    if model_type in (None, "auto"):
        model_type = _imported_family(checkpoint, iteration)
    shape = shape_from_model_config(config, model_type)
    params = {name: p.detach() for name, p in model.named_parameters()}
    backbone = [n for n in params if not is_exit_name(n)]
    has_exits = bool(config.exit_layer_nums)  # (tied exits without a norm own no tensors)
    with files.atomic_output_dir(out) as tmp:
        with tqdm(total=len(params), desc="export", unit="tensor", disable=not progress) as bar:
            sizes = [(n, params[n].numel() * params[n].element_size()) for n in backbone]
            _write_weights(tmp, params, files.plan_shards(sizes, max_shard_bytes), "model", shape, bar)
            if has_exits:
                exits = [n for n in params if is_exit_name(n)]
                _write_weights(tmp, params, [exits], files.EXIT_WEIGHTS[: -len(".safetensors")], shape, bar)
        section = exit_section(config, files.EXIT_WEIGHTS) if has_exits else None
        cfg = hf_config(shape, getattr(tokenizer, "bos", None), tokenizer.eod, getattr(tokenizer, "pad", None), section)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        _export_tokenizer(config.tokenizer, tmp)
    return os.path.abspath(out)


# The names these functions had when Llama was the only family.
import_llama, export_llama = import_hf, export_hf
