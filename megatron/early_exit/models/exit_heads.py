"""Exit heads: what turns an intermediate hidden state into next-token logits.

An exit is built from a spec with named slots, like megatron-core's layers:

    [mlp]  own MLP branch on the layer's post-attention state (shares its attention and,
           applied at call time, its pre-MLP norm: the head owns no norm there, in
           either layout, see layer_specs.pre_mlp_norm)
    [block] one extra transformer layer
    [norm] own norm, of the model's normalization type
    output_layer  column-parallel projection to the vocabulary; tied exits borrow the
                  word-embedding matrix at call time instead of owning a weight

Every slot but the output layer is optional (IdentityOp when off).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core import tensor_parallel
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import make_viewless_tensor
from torch import Tensor

from megatron.early_exit.config import EarlyExitConfig
from megatron.early_exit.models.layer_specs import get_exit_mlp_spec


@dataclass
class ExitHeadSubmodules:
    mlp: Union[ModuleSpec, type] = IdentityOp
    block: Union[ModuleSpec, type] = IdentityOp
    norm: Union[ModuleSpec, type] = IdentityOp


def get_exit_head_spec(ee_config: EarlyExitConfig, layer_spec: ModuleSpec, norm_spec) -> ModuleSpec:
    """Fill the head's slots from the early-exit flags, reusing the backbone's layer spec."""
    return ModuleSpec(
        module=ExitHead,
        submodules=ExitHeadSubmodules(
            mlp=get_exit_mlp_spec(layer_spec) if ee_config.use_exit_mlp else IdentityOp,
            block=layer_spec if ee_config.use_exit_block else IdentityOp,
            norm=norm_spec if ee_config.use_exit_norm else IdentityOp,
        ),
    )


class ExitHead(MegatronModule):
    """One exit at global layer `layer_number`."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: ExitHeadSubmodules,
        layer_number: int,
        vocab_size: int,
        tied: bool,
        temperature: float = 1.0,
        parallel_output: bool = True,
    ):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.tied = tied
        self.temperature = temperature
        self.has_mlp = submodules.mlp is not IdentityOp
        self.has_block = submodules.block is not IdentityOp
        self.mlp = build_module(submodules.mlp, config=config) if self.has_mlp else None
        # The layer number of a TransformerLayer only matters for query-key layer scaling,
        # which the exit block does not use.
        self.block = build_module(submodules.block, config=config, layer_number=1) if self.has_block else None
        self.norm = build_module(
            submodules.norm, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
        )
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            config.hidden_size,
            vocab_size,
            config=config,
            init_method=config.init_method,
            bias=False,
            skip_bias_add=False,
            gather_output=not parallel_output,
            skip_weight_param_allocation=tied,
        )
        if not tied:
            self.output_layer.weight.is_embedding_or_output_parameter = True

    def hidden(
        self,
        hidden_states: Tensor,
        attention_output: Optional[Tensor] = None,
        pre_mlp_layernorm=None,
        attention_mask: Optional[Tensor] = None,
        rotary_pos_emb: Optional[Tensor] = None,
    ) -> Tensor:
        """Hidden state the exit projects ([s, b, h]).

        With an exit MLP, `hidden_states` is ignored: the branch starts from the layer's
        post-attention state `attention_output`, through the layer's own pre-MLP norm.
        """
        if self.has_mlp:
            mlp_input = pre_mlp_layernorm(attention_output)
            # Same bias-dropout-add as the layer's own MLP branch.
            bda = get_bias_dropout_add(self.training, self.config.bias_dropout_fusion)
            hidden_states = bda(self.mlp(mlp_input), attention_output, self.config.hidden_dropout)
        if self.has_block:
            hidden_states, _ = self.block(
                hidden_states=hidden_states, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb
            )
        hidden_states = self.norm(hidden_states)
        return make_viewless_tensor(inp=hidden_states, requires_grad=hidden_states.requires_grad, keep_graph=True)

    def logits(self, hidden_states: Tensor, tied_weight: Optional[Tensor] = None) -> Tensor:
        """Vocab-parallel logits [s, b, v/tp], divided by the exit's temperature."""
        if self.tied and tied_weight is None:
            raise ValueError(f"exit at layer {self.layer_number} is tied but no embedding weight was given")
        logits, _ = self.output_layer(hidden_states, weight=tied_weight if self.tied else None)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits


def vocab_parallel_max_prob(logits: Tensor) -> Tensor:
    """Detached top-1 probability of vocab-parallel logits [s, b, v/tp] -> [s, b].

    The softmax max is exp(m - logsumexp) = 1 / sum(exp(logits - m)) with m the global max,
    so two small all-reduces over TP suffice.
    """
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    with torch.no_grad():
        logits = logits.float()
        m = logits.max(dim=-1).values
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
        sum_exp = torch.exp(logits - m.unsqueeze(-1)).sum(dim=-1)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(sum_exp, group=group)
        return 1.0 / sum_exp
