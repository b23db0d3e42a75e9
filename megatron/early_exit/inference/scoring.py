"""Score token sequences: per-position log-probabilities in one forward pass per batch.

    result = score(model, [[5, 17, 3, 9]], exit_layer=2, top_n=5)
    result.logprobs[0][t]   log p(seq[t + 1] | seq[:t + 1]) under exit 2's head
    result.top_tokens[0][t] the 5 likeliest tokens at position t, best first

Sequences are right-padded into a batch; attention is causal, so the padding after a
row's last token never changes its logits. The log-softmax runs over the real
vocabulary: ids the embedding only holds as padding are never scored or offered.

`score_layers` scores under several heads (exits and the final layer) from the same pass.
Any TP (vocab-parallel logits are gathered); over pipeline stages, each stage up to the
deepest scoring one runs its layers on the previous stage's hidden states, and each head's
stage (the last, or the exit's) broadcasts its numbers to every stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from megatron.early_exit.inference.errors import InferenceConfigError
from megatron.early_exit.inference.layers import scoring_vocab_size


@dataclass
class ScoreResult:
    logprobs: List[List[float]]  # per sequence: len(seq)-1 values, logprobs[i][t] = log p(seq[t+1] | seq[:t+1])
    greedy: List[List[bool]]  # seq[t+1] is the argmax at position t
    top_tokens: List[List[List[int]]]  # per position, the top_n token ids (empty lists when top_n == 0), best first
    top_logprobs: List[List[List[float]]]
    exit_layer: int  # the layer whose head scored (num_layers = the final layer)

    def sum_logprobs(self, index: int, start: int = 0) -> float:
        """log p(seq[start+1:] | seq[:start+1]) of sequence `index`."""
        return float(sum(self.logprobs[index][start:]))


def resolve_exit_layer(model, exit_layer: Optional[int]) -> int:
    """The layer that scores: an exit's --exit-layer-nums entry, or num_layers (the final layer)."""
    num_layers = model.config.num_layers
    if exit_layer is None or exit_layer == num_layers:
        return num_layers
    exits = list(model.ee_config.exit_layer_nums)
    if exit_layer not in exits:
        raise InferenceConfigError(
            f"exit_layer {exit_layer} is not an exit of this model "
            f"(its exits: {exits}; {num_layers} is the final layer)"
        )
    return int(exit_layer)


def _validate(sequences, vocab: int, max_len: int, top_n: int, batch_size) -> List[List[int]]:
    if isinstance(sequences, Tensor):
        sequences = sequences.tolist()
    sequences = [[int(t) for t in s] for s in sequences]
    if not sequences:
        raise InferenceConfigError("no sequences to score")
    empty = [i for i, s in enumerate(sequences) if not s]
    if empty:
        raise InferenceConfigError(f"empty sequence at index {empty[:5]}: every sequence needs at least one token")
    bad = sorted({t for s in sequences for t in s if not 0 <= t < vocab})
    if bad:
        raise InferenceConfigError(f"token ids {bad[:5]} outside the vocabulary [0, {vocab})")
    longest = max(len(s) for s in sequences)
    if longest > max_len:
        raise InferenceConfigError(
            f"sequence of {longest} tokens exceeds the model's maximum sequence length {max_len}"
        )
    if not 0 <= top_n <= vocab:
        raise InferenceConfigError(f"top_n must be in [0, {vocab}], got {top_n}")
    if batch_size is not None and batch_size < 1:
        raise InferenceConfigError(f"batch_size must be >= 1, got {batch_size}")
    return sequences


def score(
    model,
    sequences: Sequence[Sequence[int]],
    exit_layer: Optional[int] = None,
    top_n: int = 0,
    batch_size: Optional[int] = None,
    vocab_size: Optional[int] = None,
) -> ScoreResult:
    """Log-probabilities of each sequence's tokens after the first, under the final layer
    (`exit_layer` None or num_layers) or one exit's head. Every rank of the model's TP and PP
    groups calls it with the same arguments and gets the same result. `batch_size`: sequences
    per forward pass (None: all at once); `vocab_size`: the tokenizer's vocabulary, when the
    model's description does not store it."""
    layer = resolve_exit_layer(model, exit_layer)
    return score_layers(model, sequences, [layer], top_n, batch_size, vocab_size)[layer]


def score_layers(
    model,
    sequences: Sequence[Sequence[int]],
    layers: Sequence[Optional[int]],
    top_n: int = 0,
    batch_size: Optional[int] = None,
    vocab_size: Optional[int] = None,
) -> Dict[int, ScoreResult]:
    """score() under several heads at once ({layer: result}): one forward pass per batch
    feeds every head (an evaluation comparing exits runs the backbone once)."""
    from megatron.early_exit.inference.context import inference_context

    layers = sorted({resolve_exit_layer(model, layer) for layer in layers})
    if not layers:
        raise InferenceConfigError("no layers to score")
    vocab = scoring_vocab_size(model, vocab_size)
    sequences = _validate(sequences, vocab, model.max_sequence_length, top_n, batch_size)
    # Longest first, so that each batch pads little; results go back in the caller's order.
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    size = batch_size or len(order)
    rows = {layer: [None] * len(sequences) for layer in layers}
    with inference_context(model):
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            packed = _score_batch(model, [sequences[i] for i in chunk], layers, top_n, vocab)
            for layer in layers:
                for i, row in zip(chunk, _unpack(packed[layer], [len(sequences[i]) for i in chunk], top_n)):
                    rows[layer][i] = row
    results = {}
    for layer in layers:
        logprobs, greedy, top_tokens, top_logprobs = (list(column) for column in zip(*rows[layer]))
        results[layer] = ScoreResult(logprobs, greedy, top_tokens, top_logprobs, layer)
    return results


# -- one batch -------------------------------------------------------------------------


def _score_batch(model, batch: List[List[int]], layers: List[int], top_n: int, vocab: int) -> Dict[int, Tensor]:
    """{layer: [b, s-1, 3 + 2*top_n] float64} on every rank: per position the token's logprob,
    whether it is the argmax, the argmax, then the top ids and their logprobs (ids exact in
    float64). Each head's stage computes its numbers and broadcasts them over the pipeline."""
    from megatron.core import parallel_state

    num_stages = parallel_state.get_pipeline_model_parallel_world_size()
    sources = {layer: _scoring_stage(model, layer, num_stages) for layer in layers}
    stage = parallel_state.get_pipeline_model_parallel_rank()
    width = max(len(s) for s in batch)
    device = next(model.parameters()).device
    tokens = torch.tensor([s + [0] * (width - len(s)) for s in batch], dtype=torch.long, device=device)  # [b, s]
    heads = {}
    if stage <= max(sources.values()):
        heads = _forward_heads(
            model, tokens, [k for k in layers if sources[k] == stage], stage, max(sources.values()), num_stages
        )
    packed = {}
    for layer in layers:
        if layer in heads:  # one head's full-vocabulary logits alive at a time
            packed[layer] = _pack(heads[layer]()[:, :-1, :vocab].float(), tokens[:, 1:], top_n)
        else:
            packed[layer] = torch.empty(len(batch), width - 1, 3 + 2 * top_n, dtype=torch.float64, device=device)
        if num_stages > 1:
            group = parallel_state.get_pipeline_model_parallel_group()
            src = torch.distributed.get_process_group_ranks(group)[sources[layer]]
            torch.distributed.broadcast(packed[layer], src, group=group)
    return packed


def _scoring_stage(model, layer: int, num_stages: int) -> int:
    from megatron.early_exit.pipeline.placement import layer_stage

    if layer == model.config.num_layers:
        return num_stages - 1
    return layer_stage(layer, model.config.num_layers, num_stages)


def _forward_heads(
    model, tokens: Tensor, layers: List[int], stage: int, last_source: int, num_stages: int
) -> Dict[int, Callable[[], Tensor]]:
    """This stage's forward; for each head it owns among `layers`, a function that gives its
    full-vocabulary logits [b, s, V]."""
    from megatron.core import parallel_state

    from megatron.early_exit.inference.layers import gather_vocab
    from megatron.early_exit.pipeline.p2p import StageLinks

    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, -1)
    links = None
    if num_stages > 1:
        shape = (s, b, model.config.hidden_size)
        links = StageLinks(
            parallel_state.get_pipeline_model_parallel_group(), shape, model.config.params_dtype, tokens.device
        )
        if stage > 0:
            model.set_input_tensor(links.recv_forward())
    final = model.config.num_layers in layers
    # The last scoring stage may stop after its last exit; the stages before it may not.
    out = model(tokens, position_ids, None, run_to_final=final or stage < last_source)
    if stage < last_source:
        links.send_forward(out.hidden_states)
        links.flush()
    heads = {}
    if final:
        heads[model.config.num_layers] = lambda: gather_vocab(out.final)  # [b, s, V]
    for pending in out.exits:
        if pending.layer_number in layers:  # [s, b, V] -> [b, s, V]
            heads[pending.layer_number] = lambda p=pending: gather_vocab(p.compute_logits()).transpose(0, 1)
    return heads


def _pack(logits: Tensor, targets: Tensor, top_n: int) -> Tensor:
    logp = torch.log_softmax(logits, dim=-1)  # [b, s-1, V]
    chosen = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    argmax = logp.argmax(dim=-1)
    parts = [chosen.double(), (argmax == targets).double(), argmax.double()]
    if top_n:
        top = logp.topk(top_n, dim=-1)
        parts += [top.indices.double(), top.values.double()]
    return torch.cat([p if p.dim() == 3 else p.unsqueeze(-1) for p in parts], dim=-1)


def _unpack(packed: Tensor, lengths: List[int], top_n: int):
    """Per sequence (logprobs, greedy, top ids, top logprobs), cut to its own length."""
    values = packed.cpu().tolist()  # one read of the device per batch
    for row, n in zip(values, lengths):
        row = row[: n - 1]
        yield (
            [p[0] for p in row],
            [p[1] > 0.5 for p in row],
            [[int(t) for t in p[3 : 3 + top_n]] for p in row],
            [p[3 + top_n :] for p in row],
        )
