"""ModelConfig: what a model is, independent of how it was trained or is laid out.

One typed description, stored with every checkpoint (`model_config` in its common
state), from which the megatron-core `TransformerConfig` and the model are built:
  backbone    layers, widths, heads and query groups, normalization, activation,
              position embedding and RoPE scaling, biases (QKV biases alone too),
              query/key norms, tied embeddings
  vocabulary  the padded size the embedding has, and the divisor that padded it
  exits       the EarlyExitConfig
  tokenizer   its type and files (relative to the checkpoint when inside it)
  precision   the dtype the weights were trained in

The training entry point builds it from its flags, the Hugging Face converter from
config.json, and `megatron.early_exit.checkpoint.reader.read_model_config` from a
checkpoint (also from the stored flags of checkpoints written before it existed).
Field names are Megatron-LM's flag names (`--num-layers` is `num_layers`), as
EarlyExitConfig's are EE-LLM's.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F

from megatron.early_exit.config import EarlyExitConfig
from megatron.early_exit.errors import ConfigError

# The one table of precision names: flag, stored name and torch dtype.
DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_model_parallel_size: int = 1) -> int:
    """Megatron-LM pads the vocabulary to a multiple of divisible-by x TP for even shards."""
    multiple = divisible_by * tensor_model_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


@dataclass(frozen=True)
class TokenizerConfig:
    type: Optional[str] = None
    """A `--tokenizer-type` name (tokenizers.TOKENIZER_TYPES); None: no tokenizer of its own."""

    model: Optional[str] = None
    """SentencePiece model file, or Hugging Face tokenizer directory."""

    vocab_file: Optional[str] = None
    """GPT-2 BPE vocabulary."""

    merge_file: Optional[str] = None
    """GPT-2 BPE merges."""

    vocab_size: Optional[int] = None
    """NullTokenizer's vocabulary size (token ids are the text)."""

    def to_flags(self) -> dict:
        """The training flags that name this tokenizer."""
        return dict(
            tokenizer_type=self.type,
            tokenizer_model=self.model,
            vocab_file=self.vocab_file,
            merge_file=self.merge_file,
            vocab_size=self.vocab_size,
        )

    def build(self):
        from megatron.early_exit.tokenizers import build_tokenizer

        return build_tokenizer(self.type, self.model, self.vocab_file, self.merge_file, self.vocab_size)

    def relative_to(self, root: str) -> "TokenizerConfig":
        """The files that lie inside `root` named relative to it, so that the directory
        can be moved or copied and still find them."""
        root = os.path.abspath(root)

        def rel(path):
            if path is None:
                return path
            path = os.path.abspath(path)  # a path given relative to the working directory
            inside = os.path.commonpath([root, path]) == root
            return os.path.relpath(path, root) if inside else path

        return dataclasses.replace(
            self, model=rel(self.model), vocab_file=rel(self.vocab_file), merge_file=rel(self.merge_file)
        )

    def resolved(self, root: str) -> "TokenizerConfig":
        """Relative file names (as stored) made absolute against `root`."""

        def absolute(path):
            return path if path is None or os.path.isabs(path) else os.path.normpath(os.path.join(root, path))

        return dataclasses.replace(
            self, model=absolute(self.model), vocab_file=absolute(self.vocab_file), merge_file=absolute(self.merge_file)
        )


def default_ffn_hidden_size(hidden_size: int, swiglu: bool) -> int:
    """Megatron-LM's: 4 x hidden, or with SwiGLU (two input projections) 2/3 of that, rounded
    down to a multiple of 64, so that the MLP keeps about the same number of parameters. The
    one default of --ffn-hidden-size and of ModelConfig.ffn_hidden_size."""
    if not swiglu:
        return 4 * hidden_size
    return max(int(4 * hidden_size * 2 / 3 / 64) * 64, 64)


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    padded_vocab_size: int
    """Rows of the embedding and output layer: the tokenizer's vocabulary, padded."""

    max_position_embeddings: int
    """Longest sequence the model takes (the size of learned position embeddings)."""

    ffn_hidden_size: Optional[int] = None
    """Default `default_ffn_hidden_size` (4 x hidden_size; SwiGLU: about 2/3 of that)."""

    num_query_groups: Optional[int] = None
    """Grouped-query attention: key/value heads (None: one per attention head)."""

    kv_channels: Optional[int] = None
    """Width of a head (None: hidden_size / num_attention_heads)."""

    normalization: str = "LayerNorm"
    norm_epsilon: float = 1e-5
    swiglu: bool = False
    """SwiGLU MLP (gated, SiLU) instead of a GeLU MLP."""

    disable_bias_linear: bool = False
    add_qkv_bias: bool = False
    """Biases on the query, key and value projections even with --disable-bias-linear
    (Qwen2's attention)."""

    qk_layernorm: bool = False
    """A norm (of the model's normalization type) on each query and key head before RoPE
    (Qwen3's attention)."""

    position_embedding_type: str = "learned_absolute"
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    rotary_seq_len_interpolation_factor: Optional[float] = None
    use_rope_scaling: bool = False
    """Llama 3.x RoPE frequency scaling, by rope_scaling_factor."""

    rope_scaling_factor: float = 8.0
    untie_embeddings_and_output_weights: bool = False
    make_vocab_size_divisible_by: int = 128
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    params_dtype: str = "fp32"
    """Precision of the weights: a key of DTYPES."""

    first_stages_only: bool = False
    """The weights are the first num_layers layers of a deeper model (exits tuned on its
    first pipeline stages, --tune-exit-pipeline-parallel-size): no final layer of its own."""

    early_exit: EarlyExitConfig = field(default_factory=EarlyExitConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def __post_init__(self):
        if self.ffn_hidden_size is None:
            object.__setattr__(self, "ffn_hidden_size", default_ffn_hidden_size(self.hidden_size, self.swiglu))
        if self.params_dtype not in DTYPES:
            raise ConfigError(f"params_dtype must be one of {', '.join(DTYPES)}, got {self.params_dtype!r}")
        self.early_exit.validate_against(self.num_layers)

    # -- conversions ---------------------------------------------------------------

    @classmethod
    def backbone_fields(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name not in ("early_exit", "tokenizer")]

    @classmethod
    def from_flags(cls, values: Mapping[str, Any], padded_vocab_size: Optional[int] = None) -> "ModelConfig":
        """From flag values by name (a parsed namespace's vars, or the flags a checkpoint
        stored); `padded_vocab_size` where the values do not hold it."""
        values = dict(values)
        if padded_vocab_size is not None:
            values["padded_vocab_size"] = padded_vocab_size
        if "params_dtype" not in values:
            values["params_dtype"] = "bf16" if values.get("bf16") else "fp16" if values.get("fp16") else "fp32"
        if values.get("max_position_embeddings") is None:
            values["max_position_embeddings"] = values.get("seq_length")
        if not values.get("group_query_attention", values.get("num_query_groups") is not None):
            values["num_query_groups"] = None
        values.setdefault("first_stages_only", values.get("tune_exit_pipeline_parallel_size") is not None)
        backbone = {k: values[k] for k in cls.backbone_fields() if k in values}
        return cls(
            **backbone,
            early_exit=EarlyExitConfig.from_flags(values),
            tokenizer=TokenizerConfig(
                values.get("tokenizer_type"),
                values.get("tokenizer_model"),
                values.get("vocab_file"),
                values.get("merge_file"),
                values.get("vocab_size"),
            ),
        )

    def to_dict(self) -> dict:
        """Plain types only (stored in checkpoints, printed by tools)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(EarlyExitConfig)}
        early_exit = EarlyExitConfig(**{k: v for k, v in data.pop("early_exit", {}).items() if k in known})
        tokenizer = TokenizerConfig(**data.pop("tokenizer", {}))
        return cls(
            **{k: v for k, v in data.items() if k in cls.backbone_fields()}, early_exit=early_exit, tokenizer=tokenizer
        )

    def to_flags(self) -> Dict[str, Any]:
        """Flag values by name: the inverse of `from_flags` (for --use-checkpoint-args)."""
        flags = {
            k: getattr(self, k)
            for k in self.backbone_fields()
            if k not in ("padded_vocab_size", "params_dtype", "first_stages_only")
        }
        flags["group_query_attention"] = self.num_query_groups is not None
        flags.update(self.early_exit.to_flags())
        flags.update(self.tokenizer.to_flags())
        return flags

    # -- what it builds ------------------------------------------------------------

    @property
    def exit_layer_nums(self) -> List[int]:
        return list(self.early_exit.exit_layer_nums)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.params_dtype]

    def architecture_differences(self, other: "ModelConfig") -> List[str]:
        """`--flag: checkpoint X, now Y` for every value that changes the parameters'
        names, shapes or meaning (self: the checkpoint's)."""
        names = [k for k in self.backbone_fields() if k not in _NOT_ARCHITECTURE]
        if self.position_embedding_type != "learned_absolute":
            names.remove("max_position_embeddings")  # only learned positions have a table of that size
        out = [
            f"--{k.replace('_', '-')}: checkpoint {getattr(self, k)}, now {getattr(other, k)}"
            for k in names
            if getattr(self, k) != getattr(other, k)
        ]
        return out + self.early_exit.structure_differences(other.early_exit)

    def transformer_config(
        self,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        sequence_parallel: bool = False,
        device: Optional[torch.device] = None,
        transformer_impl: Optional[str] = None,
        params_dtype: Optional[str] = None,
        recompute=None,
    ):
        """megatron-core's TransformerConfig of this model in a parallel layout, for a
        device (kernels and layer modules follow it, not the host). `recompute`: a
        training run's RecomputeConfig (not part of the model)."""
        from megatron.core.transformer import TransformerConfig

        from megatron.early_exit.models.layer_specs import resolve_transformer_impl
        from megatron.early_exit.platform import bias_dropout_fusion_available, fused_softmax_available

        device = torch.device(device or "cpu")
        dtype_key = params_dtype or self.params_dtype
        dtype = DTYPES[dtype_key]
        return TransformerConfig(
            transformer_impl=resolve_transformer_impl(transformer_impl, device),
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels,
            normalization=self.normalization,
            layernorm_epsilon=self.norm_epsilon,
            gated_linear_unit=self.swiglu,
            activation_func=F.silu if self.swiglu else F.gelu,
            add_bias_linear=not self.disable_bias_linear,
            add_qkv_bias=self.add_qkv_bias,
            qk_layernorm=self.qk_layernorm,
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            init_method_std=self.init_method_std,
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            sequence_parallel=sequence_parallel,
            params_dtype=dtype,
            pipeline_dtype=dtype,
            bf16=dtype_key == "bf16",
            fp16=dtype_key == "fp16",
            use_cpu_initialization=True,
            perform_initialization=True,
            # Fused kernels only where they run: the plain PyTorch paths elsewhere.
            bias_dropout_fusion=bias_dropout_fusion_available(device),
            apply_rope_fusion=False,
            masked_softmax_fusion=fused_softmax_available(device),
            gradient_accumulation_fusion=False,
            persist_layer_norm=False,
            batch_p2p_sync=False,
            **(recompute.transformer_config_kwargs() if recompute is not None else {}),
        )


# Values a run may change on loaded weights: regularisation, initialisation, the padding
# divisor (the padded size itself is compared), the precision, and RoPE's frequencies
# (extending the context of a trained model changes them on purpose).
_NOT_ARCHITECTURE = {
    "first_stages_only",
    "hidden_dropout",
    "attention_dropout",
    "init_method_std",
    "make_vocab_size_divisible_by",
    "params_dtype",
    "norm_epsilon",
    "rotary_base",
    "rotary_percent",
    "rotary_seq_len_interpolation_factor",
    "use_rope_scaling",
    "rope_scaling_factor",
}
