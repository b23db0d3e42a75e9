"""Early exit in transformers: a directory written by `convert_hf.py --direction to-hf`,
its backbone and its exits, with no remote code.

    from megatron.early_exit.hf.modeling import EarlyExitForCausalLM

    model = EarlyExitForCausalLM.from_pretrained("hf/llama2-7b-ee", dtype=torch.bfloat16)
    out = model(input_ids)                 # out.logits: final; out.exit_logits: {layer: logits}
    tokens, layers = model.generate_early_exit(input_ids, threshold=0.8, max_new_tokens=32)

The backbone is transformers' own class for the family (`AutoModelForCausalLM`:
LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM). Each exit is
built from the backbone's own modules, as our exit heads are from the layer spec, and
computes what ours compute (models/exit_heads.py):

  input   the output of its layer, or its input with pre_exit (output_hidden_states)
  [mlp]   an MLP of the layer's shape on the layer's post-attention state, through the
          layer's own post-attention norm, plus that state (the residual)
  [block] one more decoder layer, causal, with the backbone's RoPE
  [norm]  an RMSNorm
  lm_head its own, or the word embedding (tied exits), then / temperature

`early_exit_heads.safetensors` holds their tensors under the same names (`exits.{layer}.`
+ `norm`, `mlp.*`, `block.*`, `lm_head`).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from megatron.early_exit.config import EarlyExitConfig
from megatron.early_exit.hf.errors import ConversionError
from megatron.early_exit.hf.mapping import exit_config


class ExitHead(torch.nn.Module):
    """One exit, made of copies of the backbone's modules (weights loaded afterwards)."""

    def __init__(self, backbone, config: EarlyExitConfig, layer_number: int, temperature: float):
        super().__init__()
        inner = backbone.model
        self.layer_number = layer_number
        self.temperature = temperature
        self.mlp = copy.deepcopy(inner.layers[0].mlp) if config.use_exit_mlp else None
        self.block = copy.deepcopy(inner.layers[0]) if config.use_exit_block else None
        if self.block is not None:
            self.block.self_attn.layer_idx = 0  # never used with a cache
        self.norm = copy.deepcopy(inner.norm) if config.use_exit_norm else None
        self.lm_head = copy.deepcopy(backbone.lm_head) if config.untie_exit_output_weights else None

    def forward(
        self, hidden: Tensor, post_attention: Optional[Tensor], layer, block_inputs: dict, word_embeddings: Tensor
    ) -> Tensor:
        """hidden [b, s, h] (and the layer's post-attention state for an MLP exit) -> logits
        [b, s, v]; tied exits project with `word_embeddings`."""
        if self.mlp is not None:
            hidden = post_attention + self.mlp(layer.post_attention_layernorm(post_attention))
        if self.block is not None:
            hidden = self.block(hidden, **block_inputs)
        if self.norm is not None:
            hidden = self.norm(hidden)
        weight = self.lm_head.weight if self.lm_head is not None else word_embeddings
        logits = torch.nn.functional.linear(hidden, weight)
        return logits / self.temperature if self.temperature != 1.0 else logits


@dataclass
class EarlyExitCausalLMOutput:
    logits: Tensor  # [b, s, v] the final layer's
    exit_logits: Dict[int, Tensor]  # exit layer -> [b, s, v], in layer order


class EarlyExitForCausalLM(torch.nn.Module):
    """A transformers causal LM with the early exits of our export."""

    def __init__(self, backbone, exits: EarlyExitConfig):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.early_exit = exits
        self.pre_exit = exits.pre_exit
        self.exits = torch.nn.ModuleDict(
            {
                str(n): ExitHead(backbone, exits, n, t)
                for n, t in zip(exits.exit_layer_nums, exits.exit_layer_temperature)
            }
        )

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "EarlyExitForCausalLM":
        """`kwargs` go to AutoModelForCausalLM.from_pretrained (dtype, device_map, ...)."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        config_path = os.path.join(path, "config.json")
        with open(config_path) as f:
            section = json.load(f).get("early_exit")
        if not section:
            raise ConversionError(f"{config_path} has no early_exit section: the model has no exits")
        backbone = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
        model = cls(backbone, exit_config(section, config_path)).eval()
        weights_path = os.path.join(path, section.get("weights_file", "early_exit_heads.safetensors"))
        tensors = load_file(weights_path) if os.path.isfile(weights_path) else {}
        expected = set(model.exits.state_dict(prefix="exits."))
        missing, unknown = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unknown:
            raise ConversionError(
                f"{weights_path}: {len(missing)} exit tensors missing (e.g. {missing[:2]}), "
                f"{len(unknown)} unknown (e.g. {unknown[:2]}) for config.json's early_exit section"
            )
        dtype = backbone.get_input_embeddings().weight.dtype
        device = backbone.get_input_embeddings().weight.device
        model.exits.load_state_dict({k[len("exits.") :]: v.to(device, dtype) for k, v in tensors.items()})
        model.exits.to(device, dtype)
        return model

    def forward(
        self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, position_ids: Optional[Tensor] = None
    ) -> EarlyExitCausalLMOutput:
        """Final and exit logits of input_ids [b, s] (attention_mask [b, s]: 1 for tokens, 0 for padding)."""
        layers = self.backbone.model.layers
        captured: Dict[str, Tensor] = {}
        hooks = self._capture(layers, captured)
        try:
            out = self.backbone(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                output_hidden_states=True,
                use_cache=False,
            )
        finally:
            for hook in hooks:
                hook.remove()
        block_inputs = self._block_inputs(out.hidden_states[0], attention_mask, position_ids)
        embeddings = self.backbone.get_input_embeddings().weight
        exit_logits = {}
        for head in self.exits.values():
            n = head.layer_number
            # hidden_states[i]: the input of layer i (0-based); the last entry is normed, hence the hook.
            if self.pre_exit:
                hidden = out.hidden_states[n - 1]
            else:
                hidden = captured["last"] if n == len(layers) else out.hidden_states[n]
            exit_logits[n] = head(hidden, captured.get(f"attn{n}"), layers[n - 1], block_inputs, embeddings)
        return EarlyExitCausalLMOutput(out.logits, exit_logits)

    def _capture(self, layers, captured: Dict[str, Tensor]) -> List:
        """Hooks for what output_hidden_states leaves out: the last layer's output before
        the final norm, and the post-attention state (the post-attention norm's input)
        of layers with an MLP exit."""
        hooks = []
        last = len(layers)
        if str(last) in self.exits and not self.pre_exit:
            hooks.append(
                layers[-1].register_forward_hook(
                    lambda module, args, output: captured.__setitem__(
                        "last", output[0] if isinstance(output, tuple) else output
                    )
                )
            )
        for head in self.exits.values():
            if head.mlp is not None:
                n = head.layer_number
                hooks.append(
                    layers[n - 1].post_attention_layernorm.register_forward_pre_hook(
                        lambda module, args, n=n: captured.__setitem__(f"attn{n}", args[0])
                    )
                )
        return hooks

    def _block_inputs(
        self, embeddings: Tensor, attention_mask: Optional[Tensor], position_ids: Optional[Tensor]
    ) -> dict:
        """The causal mask and RoPE a decoder layer takes, as the backbone makes them."""
        if not any(head.block is not None for head in self.exits.values()):
            return {}
        from transformers.masking_utils import create_causal_mask

        if position_ids is None:
            position_ids = torch.arange(embeddings.shape[1], device=embeddings.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=embeddings,
            attention_mask=attention_mask,
            cache=None,
            position_ids=position_ids,
        )
        rope = self.backbone.model.rotary_emb(embeddings, position_ids=position_ids)
        return {"attention_mask": mask, "position_embeddings": rope, "position_ids": position_ids}

    @torch.no_grad()
    def generate_early_exit(
        self, input_ids: Tensor, threshold: float = 0.9, max_new_tokens: int = 32
    ) -> Tuple[Tensor, List[List[int]]]:
        """Greedy decoding where each token comes from the first exit whose top-1
        probability reaches `threshold`, else from the final layer; input_ids [b, s] are
        rows of one length (no padding). Returns (input_ids with the new tokens [b, s + n],
        each new token's layer per row). Every step runs
        the whole model on the whole sequence: the same tokens an early-exit decoder
        with recomputed K/V picks, without its savings."""
        tokens, layers = input_ids, [[] for _ in range(input_ids.shape[0])]
        num_layers = len(self.backbone.model.layers)
        for _ in range(max_new_tokens):
            out = self(tokens)
            chosen = out.logits[:, -1].argmax(-1)
            layer = torch.full_like(chosen, num_layers)
            decided = torch.zeros_like(chosen, dtype=torch.bool)
            for n, logits in out.exit_logits.items():
                confident = (torch.softmax(logits[:, -1].float(), -1).max(-1).values >= threshold) & ~decided
                chosen = torch.where(confident, logits[:, -1].argmax(-1), chosen)
                layer = torch.where(confident, n, layer)
                decided |= confident
            tokens = torch.cat([tokens, chosen.unsqueeze(1)], dim=1)
            for row, n in enumerate(layer.tolist()):
                layers[row].append(n)
        return tokens, layers
