"""Self-speculative decoding (LayerSkip): draft with an exit, verify with the full model.

A round, per active row holding committed tokens x_0..x_{n-1} (x_{n-1} not yet fed):
  draft   feed x_{n-1}, y_1, .., y_{k-1} through the layers up to the exit: its head
          proposes y_1..y_k greedily; those layers' K/V are kept, deeper layers owe them.
          With a draft threshold, a row stops drafting (k is smaller) after a draft the
          exit is not confident about (Draft & Verify's adaptive draft length).
  verify  feed y_k: one full-depth pass in which every deeper layer processes the k+1
          owed positions together (the decoder's recomputation path), giving the full
          model's next-token logits z_0..z_k at positions n-1..n-1+k.
  accept  the longest prefix with y_i == z_{i-1}, then z_a; crop every layer's cache
          to n + a positions, so rejected drafts leave nothing behind.
Greedy output equals full-depth greedy decoding. Rows of a batch draft in lockstep and
accept independently.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from megatron.early_exit.inference.decoder import Decoder, ExitPolicy


def draft_tokens(decoder: Decoder, transcript, budgets: Dict[int, int], policy: ExitPolicy,
                 threshold: float = 0.0) -> Dict[int, List[int]]:
    """Up to budgets[r] greedy drafts per row; a row stops early after a draft whose
    probability under the drafting exit is below `threshold` (it is likely rejected, and
    every draft after it would be thrown away with it)."""
    drafts: Dict[int, List[int]] = {r: [] for r in budgets}
    going = [r for r, k in budgets.items() if k > 0]
    while going:
        out = decoder.step(going, [[drafts[r][-1] if drafts[r] else transcript.last_token(r)] for r in going], policy)
        transcript.result.num_steps += 1
        if threshold > 0:
            confidence, tokens = out.logits.float().softmax(dim=-1).max(dim=-1)
            picked = torch.stack([tokens.double(), confidence.double()], dim=-1).tolist()  # one device read
        else:
            picked = [(t, 1.0) for t in out.logits.argmax(dim=-1).tolist()]
        for r, (t, _) in zip(going, picked):
            drafts[r].append(int(t))
        going = [r for r, (_, c) in zip(going, picked) if len(drafts[r]) < budgets[r] and c >= threshold]
    return drafts


def verify(decoder: Decoder, transcript, drafts: Dict[int, List[int]]) -> Dict[int, List[Tuple]]:
    """The full model's greedy token, its log-probability and the transcript's top_n
    alternatives at each row's k+1 owed positions, read from the device once for the batch."""
    rows = list(drafts)
    newest = [[drafts[r][-1] if drafts[r] else transcript.last_token(r)] for r in rows]
    out = decoder.step(rows, newest, all_logits=True)
    transcript.result.num_steps += 1
    logprobs = torch.log_softmax(torch.cat(out.chunk_logits).float(), dim=-1)  # [sum(k+1), vocab]
    best, tokens = logprobs.max(dim=-1)
    n = transcript.top_n
    columns = [tokens.double().unsqueeze(-1), best.double().unsqueeze(-1)]
    if n > 0:
        top = logprobs.topk(n, dim=-1)
        columns += [top.indices.double(), top.values.double()]
    columns = torch.cat(columns, dim=-1).tolist()
    targets, offset = {}, 0
    for r, chunk in zip(rows, out.chunk_logits):
        targets[r] = [(int(c[0]), c[1], [int(t) for t in c[2:2 + n]], c[2 + n:])
                      for c in columns[offset:offset + len(chunk)]]
        offset += len(chunk)
    return targets


def accepted_length(drafts: List[int], targets: List[int]) -> int:
    a = 0
    while a < len(drafts) and drafts[a] == targets[a]:
        a += 1
    return a


def speculative_decode(decoder: Decoder, transcript, strategy) -> None:
    policy = strategy.draft_policy(decoder)
    draft_depth = next(iter(policy.exits))
    result = transcript.result
    while transcript.going():
        # Never draft past the budget: the last token of a row needs no draft.
        budgets = {r: max(0, min(strategy.num_draft, transcript.max_new_tokens - len(result.tokens[r]) - 1))
                   for r in transcript.active}
        drafts = draft_tokens(decoder, transcript, budgets, policy, strategy.draft_threshold)
        verified = verify(decoder, transcript, drafts)
        for r, row_drafts in drafts.items():
            committed = decoder.num_fed[r] - len(row_drafts)  # n: x_{n-1} sits at position n-1
            targets = [v[0] for v in verified[r]]
            a = accepted_length(row_drafts, targets)
            # The accepted drafts equal the full model's tokens, so all a+1 new tokens and
            # their log-probabilities are the full model's.
            kept = verified[r][: a + 1]
            transcript.append(r, targets[: a + 1], [draft_depth] * a + [decoder.num_layers], [v[1] for v in kept],
                              [v[2] for v in kept], [v[3] for v in kept])
            decoder.crop(r, committed + a)
            result.num_drafted += len(row_drafts)
            result.num_accepted += a
