"""EarlyExitGPTModel: megatron-core's GPTModel with exit heads and its own layer loop.

Embedding, transformer layers, final norm and output layer are megatron-core's (so
with no exits the model computes exactly what GPTModel computes). The model owns
the loop over its layers so that it can (a) hand exit states out lazily: an exit's
head runs only when the caller asks for its loss, just before backward; and
(b) let inference stop at an exit.

The model knows nothing of pipeline scheduling or DDP: a stage is built with
`pre_process`/`post_process` and gets the layers megatron-core assigns to it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import make_viewless_tensor
from torch import Tensor

from megatron.early_exit.config import EarlyExitConfig
from megatron.early_exit.distillation import Distillation, distillation_loss
from megatron.early_exit.errors import ConfigError
from megatron.early_exit.models.attention_environment import prepare_attention_environment, record_attention_environment
from megatron.early_exit.models.exit_heads import get_exit_head_spec, vocab_parallel_max_prob
from megatron.early_exit.models.layer_specs import (
    choose_impl,
    get_block_spec,
    get_layer_spec,
    get_norm_spec,
    pre_mlp_norm,
)
from megatron.early_exit.models.recompute import recompute_units


@dataclass
class ExitState:
    """What an exit needs from the backbone; its head runs later, on demand."""

    layer_number: int
    hidden_states: Tensor  # [s, b, h] input (pre-exit) or output (post-exit) of the layer
    attention_output: Optional[Tensor] = None  # [s, b, h] post-attention state, for exit MLPs


@dataclass
class EarlyExitOutput:
    """One stage's forward result.

    final: per-token final loss [b, s] when labels were given, else logits [b, s, v]
           (None on a stage without the output layer).
    hidden_states: this stage's output [s, b, h] (what a pipeline sends on).
    exits: lazily evaluated exits of this stage, in layer order.
    teacher_logits: with labels and self-distillation (--exit-distill-weight), a detached
           copy of the final vocab-parallel logits [s, b, v/tp] that the exits learn from.
    """

    final: Optional[Tensor]
    hidden_states: Tensor
    exits: List["PendingExit"] = field(default_factory=list)
    teacher_logits: Optional[Tensor] = None


@dataclass
class PendingExit:
    layer_number: int
    compute_logits: Callable[[], Tensor]  # -> vocab-parallel logits [s, b, v/tp]
    # (need_confidence, Distillation or None) -> ([b, s] CE, [b, s] confidence or None, [b, s] distillation or None)
    compute_loss: Callable[..., Tuple[Tensor, Optional[Tensor], Optional[Tensor]]]


class EarlyExitGPTModel(GPTModel):
    def __init__(
        self,
        config: TransformerConfig,
        ee_config: EarlyExitConfig,
        vocab_size: int,
        max_sequence_length: int,
        pre_process: bool = True,
        post_process: bool = True,
        share_embeddings_and_output_weights: bool = True,
        position_embedding_type: str = "rope",
        rotary_base: int = 10000,
        rotary_percent: float = 1.0,
        parallel_output: bool = True,
        use_te: Optional[bool] = None,
        seq_len_interpolation_factor: Optional[float] = None,
        rope_scaling: bool = False,
        rope_scaling_factor: float = 8.0,
        transformer_impl: Optional[str] = None,
        document_mask: bool = False,
        recompute_exit_heads: bool = False,
        vp_stage: Optional[int] = None,
        layer_dropout_seed: int = 0,
    ):
        """`transformer_impl` (or the older `use_te`) overrides `config.transformer_impl`
        (see layer_specs.py: local, transformer_engine, te_standin). `document_mask`: the
        attention mask given to forward is any mask (--reset-attention-mask), not causal.
        Layers are recomputed in backward as `config.recompute_*` say (see recompute.py);
        `recompute_exit_heads` recomputes each exit head in backward too. `vp_stage`: the
        model chunk of an interleaved pipeline (megatron-core's layer offsets). `layer_dropout_seed`:
        with the count of training forwards, it seeds which sequences skip which layers
        (--layer-dropout-max): the same on every TP rank and pipeline stage."""
        ee_config.validate_against(config.num_layers)
        impl = choose_impl(config, use_te, transformer_impl)
        written = prepare_attention_environment(config)  # megatron-core passes these to TE through os.environ
        super().__init__(
            config=config,
            transformer_layer_spec=get_block_spec(
                config, get_num_layers_to_build(config, vp_stage), impl=impl, document_mask=document_mask
            ),
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=share_embeddings_and_output_weights,
            position_embedding_type=position_embedding_type,
            rotary_base=rotary_base,
            rotary_percent=rotary_percent,
            seq_len_interpolation_factor=seq_len_interpolation_factor,
            rope_scaling=rope_scaling,
            rope_scaling_factor=rope_scaling_factor,
            vp_stage=vp_stage,
        )
        record_attention_environment(written)
        self.ee_config = ee_config
        self.transformer_impl = impl
        self.recompute_exit_heads = recompute_exit_heads
        self.layer_dropout_seed = layer_dropout_seed
        self.layer_dropout_step = 0  # training forwards so far: one draw of skipped layers each
        head_spec = get_exit_head_spec(
            ee_config, get_layer_spec(config, impl=impl, document_mask=document_mask), get_norm_spec(impl=impl)
        )
        local_layers = {layer.layer_number for layer in self.decoder.layers}
        tied = not ee_config.untie_exit_output_weights
        self.exits = torch.nn.ModuleDict()
        for num, temperature in zip(ee_config.exit_layer_nums, ee_config.exit_layer_temperature):
            if num in local_layers:
                self.exits[str(num)] = build_module(
                    head_spec,
                    config=config,
                    layer_number=num,
                    vocab_size=vocab_size,
                    tied=tied,
                    temperature=temperature,
                    parallel_output=parallel_output,
                )
        if ee_config.exit_distill_weight and len(self.exits) and not post_process:
            raise ConfigError(
                f"--exit-distill-weight: exits {sorted(int(k) for k in self.exits)} are on a stage "
                "without the output layer, whose logits they would learn from"
            )
        self.exit_word_embeddings = None
        if tied and len(self.exits) and not self.pre_process and not self._output_layer_is_embedding_copy():
            # A later pipeline stage with tied exits keeps its own copy of the word
            # embedding (initialised like it, gradients all-reduced with it).
            self.exit_word_embeddings = torch.nn.Parameter(
                torch.empty(self.embedding_shard_shape(), dtype=config.params_dtype)
            )
            tensor_parallel.set_tensor_model_parallel_attributes(self.exit_word_embeddings, True, 0, 1)
            self.exit_word_embeddings.shared_embedding = True
            self.exit_word_embeddings.shared = True  # counted once in the gradient norm

    # -- building blocks (also used by inference) ------------------------------

    def _output_layer_is_embedding_copy(self) -> bool:
        return self.post_process and self.share_embeddings_and_output_weights

    def embedding_shard_shape(self):
        from megatron.core import parallel_state

        return (self.vocab_size // parallel_state.get_tensor_model_parallel_world_size(), self.config.hidden_size)

    def exit_output_weight(self) -> Optional[Tensor]:
        """The word-embedding matrix (or this stage's copy of it) that tied exits project with."""
        if self.pre_process:
            return self.embedding.word_embeddings.weight
        if self._output_layer_is_embedding_copy():
            return self.output_layer.weight
        return self.exit_word_embeddings

    def tied_embedding_weight(self) -> Optional[Tensor]:
        """This stage's instance of the word embedding when the embedding is shared across
        pipeline stages (tied output layer, tied exits); its gradient is all-reduced over them."""
        if self.pre_process:
            return self.embedding.word_embeddings.weight
        uses_copy = self._output_layer_is_embedding_copy() or (
            len(self.exits) and not self.ee_config.untie_exit_output_weights
        )
        return self.exit_output_weight() if uses_copy else None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """megatron-core's checkpoint view, with the exits keyed by global layer number.

        The heads sit in a ModuleDict, which megatron-core would save as replicated
        tensors; each head describes its own TP split instead. A later stage's copy of the
        word embedding is saved as a replica of the first stage's embedding."""
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import make_tp_sharded_tensor_for_checkpoint

        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        for key in [k for k in state if k.startswith(f"{prefix}exits.") or k == f"{prefix}exit_word_embeddings"]:
            del state[key]
        for num, head in self.exits.items():
            state.update(head.sharded_state_dict(f"{prefix}exits.{num}.", (), metadata))
        if self.exit_word_embeddings is not None:
            state[f"{prefix}exit_word_embeddings"] = make_tp_sharded_tensor_for_checkpoint(
                tensor=self.exit_word_embeddings,
                key=f"{prefix}embedding.word_embeddings.weight",
                replica_id=(1, 0, parallel_state.get_data_parallel_rank(with_context_parallel=True)),
                allow_shape_mismatch=True,
            )
        return state

    def layer_dropout_probs(self) -> List[float]:
        return [
            self.ee_config.layer_dropout_prob(layer.layer_number, self.config.num_layers)
            for layer in self.decoder.layers
        ]

    def layer_dropout_keep(self, step: int, batch_size: int) -> Dict[int, List[int]]:
        """LayerSkip layer dropout at training forward `step`: {layer number: the sequences
        (batch indices) that run it}, for this stage's layers. Drawn for every layer of the
        model from a generator seeded by (seed, step), so every TP rank and every pipeline
        stage draws what a single process would."""
        ee, num_layers = self.ee_config, self.config.num_layers
        generator = torch.Generator().manual_seed(self.layer_dropout_seed * 1_000_003 + step)
        draws = torch.rand(num_layers, batch_size, generator=generator).tolist()  # host-side: no device sync
        keep = {}
        for layer in self.decoder.layers:
            prob = ee.layer_dropout_prob(layer.layer_number, num_layers)
            keep[layer.layer_number] = [i for i, d in enumerate(draws[layer.layer_number - 1]) if d >= prob]
        return keep

    def _rng_context(self):
        # As TransformerBlock does: under sequence parallelism each TP rank holds other
        # tokens, so dropout must draw from the TP-distinct tracker stream.
        return tensor_parallel.get_cuda_rng_tracker().fork() if self.config.sequence_parallel else nullcontext()

    def _run_layer(self, layer, hidden_states, attention_mask, rotary_pos_emb, need_attention_output):
        if not need_attention_output:
            hidden_states, _ = layer(
                hidden_states=hidden_states, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb
            )
            return hidden_states, None
        attention_output, _ = layer._forward_attention(
            hidden_states=hidden_states, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb
        )
        return layer._forward_mlp(attention_output), attention_output

    # -- forward --------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Optional[Tensor],
        labels: Optional[Tensor] = None,
        decoder_input: Optional[Tensor] = None,
        run_to_final: bool = True,
    ) -> EarlyExitOutput:
        """`run_to_final=False` stops after this stage's last exit (exit tuning needs no more)."""
        hidden_states, rotary_pos_emb = self._preprocess(
            input_ids=input_ids, position_ids=position_ids, decoder_input=decoder_input
        )[:2]
        if not self.pre_process:
            hidden_states = self.decoder.input_tensor
        hidden_states = make_viewless_tensor(inp=hidden_states, requires_grad=True, keep_graph=True)

        states: List[ExitState] = []
        keep = None
        if self.training and self.ee_config.layer_dropout_max > 0:
            keep = self.layer_dropout_keep(self.layer_dropout_step, hidden_states.shape[1])
            self.layer_dropout_step += 1
        last_exit = max((int(k) for k in self.exits), default=0)
        num_layers = (
            len(self.decoder.layers)
            if run_to_final
            else sum(layer.layer_number <= last_exit for layer in self.decoder.layers)
        )
        c = self.config
        with self._rng_context():
            for start, end, recomputed in recompute_units(
                num_layers, c.recompute_granularity, c.recompute_method, c.recompute_num_layers
            ):
                run = self._recomputed_layers if recomputed and torch.is_grad_enabled() else self._run_layers
                hidden_states, unit_states = run(start, end, hidden_states, attention_mask, rotary_pos_emb, keep)
                states += unit_states

        exits = [self._pending_exit(s, labels, attention_mask, rotary_pos_emb) for s in states]
        if not self.post_process or not run_to_final:
            return EarlyExitOutput(final=None, hidden_states=hidden_states, exits=exits)

        hidden_states = self.decoder.final_layernorm(hidden_states)
        hidden_states = make_viewless_tensor(inp=hidden_states, requires_grad=True, keep_graph=True)
        output_weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden_states, weight=output_weight)
        teacher = None
        if labels is None:
            final = logits.transpose(0, 1).contiguous()  # [s, b, v] -> [b, s, v]
        else:
            # A copy: megatron-core's cross-entropy overwrites the logits it is given.
            teacher = logits.detach().clone() if self.ee_config.exit_distill_weight and exits else None
            final = self.compute_language_model_loss(labels, logits)  # [b, s]
        return EarlyExitOutput(final=final, hidden_states=hidden_states, exits=exits, teacher_logits=teacher)

    def _run_layers(self, start: int, end: int, hidden_states, attention_mask, rotary_pos_emb, keep=None):
        """Local layers [start, end): their output and the states of the exits among them.
        `keep` (layer dropout): {layer number: the sequences that run it}; the others skip it."""
        states: List[ExitState] = []
        pre_exit = self.ee_config.pre_exit
        batch_size = hidden_states.shape[1]
        for i in range(start, end):
            layer = self.decoder.layers[i]
            num = layer.layer_number
            head = self.exits[str(num)] if str(num) in self.exits else None
            if head is not None and pre_exit:
                states.append(ExitState(num, hidden_states))
            need_attention_output = head is not None and head.has_mlp
            rows = None if keep is None else keep[num]
            if rows is None or len(rows) == batch_size:
                hidden_states, attention_output = self._run_layer(
                    layer, hidden_states, attention_mask, rotary_pos_emb, need_attention_output
                )
            else:
                hidden_states, attention_output = self._run_layer_on_rows(
                    layer, rows, hidden_states, attention_mask, rotary_pos_emb, need_attention_output
                )
            if head is not None and not pre_exit:
                states.append(ExitState(num, hidden_states, attention_output))
        return hidden_states, states

    def _recomputed_layers(self, start: int, end: int, hidden_states, attention_mask, rotary_pos_emb, keep=None):
        """`_run_layers` under megatron-core's activation checkpoint: only the unit's input
        is kept, and the exit states inside it are extra outputs of the checkpoint (their
        heads need them anyway)."""
        layout: List[Tuple[int, bool]] = []  # (layer number, has attention output) per exit state

        def unit(hidden, mask, rope):
            out, states = self._run_layers(start, end, hidden, mask, rope, keep)
            layout[:] = [(s.layer_number, s.attention_output is not None) for s in states]
            return (out,) + tuple(t for s in states for t in (s.hidden_states, s.attention_output) if t is not None)

        outputs = tensor_parallel.checkpoint(
            unit, self.config.distribute_saved_activations, hidden_states, attention_mask, rotary_pos_emb
        )
        outputs = (outputs,) if isinstance(outputs, Tensor) else outputs
        rest, states = list(outputs[1:]), []
        for num, has_attention in layout:
            hidden = rest.pop(0)
            states.append(ExitState(num, hidden, rest.pop(0) if has_attention else None))
        return outputs[0], states

    def _run_layer_on_rows(
        self, layer, rows: List[int], hidden_states, attention_mask, rotary_pos_emb, need_attention_output
    ):
        """LayerSkip layer dropout: only the sequences `rows` run the layer; for the others it
        is the identity (its post-attention state, read by an exit MLP, is its input), and
        costs nothing."""
        if not rows:
            return hidden_states, hidden_states if need_attention_output else None
        index = torch.tensor(rows, device=hidden_states.device)
        if attention_mask is not None and attention_mask.shape[0] > 1:  # a per-sequence mask [b, 1, s, s]
            attention_mask = attention_mask.index_select(0, index)
        out, attention_output = self._run_layer(
            layer, hidden_states.index_select(1, index), attention_mask, rotary_pos_emb, need_attention_output
        )
        out = hidden_states.index_copy(1, index, out)  # [s, b, h]: the skipping rows keep their input
        if attention_output is not None:
            attention_output = hidden_states.index_copy(1, index, attention_output)
        return out, attention_output

    def _pending_exit(self, state: ExitState, labels, attention_mask, rotary_pos_emb) -> PendingExit:
        head = self.exits[str(state.layer_number)]
        layer = self.decoder.layers[state.layer_number - self.decoder.layers[0].layer_number]

        def logits_of(hidden_states: Tensor, attention_output: Optional[Tensor]) -> Tensor:
            with self._rng_context():
                hidden = head.hidden(
                    hidden_states, attention_output, pre_mlp_norm(layer), attention_mask, rotary_pos_emb
                )
            return head.logits(hidden, self.exit_output_weight())

        def compute_logits() -> Tensor:
            return logits_of(state.hidden_states, state.attention_output)

        def losses(
            hidden_states: Tensor,
            attention_output: Optional[Tensor],
            need_confidence: bool,
            distill: Optional[Distillation],
        ):
            logits = logits_of(hidden_states, attention_output)
            confidence = vocab_parallel_max_prob(logits).transpose(0, 1) if need_confidence else None
            kl = distillation_loss(logits, distill) if distill else None
            # CE last: megatron-core's cross-entropy overwrites the logits it is given.
            return self.compute_language_model_loss(labels, logits), confidence, kl

        def compute_loss(need_confidence: bool = False, distill: Optional[Distillation] = None):
            inputs = (state.hidden_states, state.attention_output)
            if not (self.recompute_exit_heads and torch.is_grad_enabled() and state.hidden_states.requires_grad):
                return losses(*inputs, need_confidence, distill)
            # Only the head's inputs are kept; its logits exist again only during its backward.
            # (A frozen backbone, as in exit tuning, gives the checkpoint no input to differentiate.)
            outputs = tensor_parallel.checkpoint(
                lambda *args: _drop_none(losses(*args, need_confidence, distill)), False, *inputs
            )
            outputs = list((outputs,) if isinstance(outputs, Tensor) else outputs)
            ce = outputs.pop(0)
            confidence = outputs.pop(0).detach() if need_confidence else None
            return ce, confidence, outputs.pop(0) if distill else None

        return PendingExit(state.layer_number, compute_logits, compute_loss)


def _drop_none(values: tuple):
    """A checkpoint's outputs must be tensors."""
    return tuple(v for v in values if v is not None)
