"""Self-speculative decoding (LayerSkip): draft with an exit, verify with the full model.

A round, per active row holding committed tokens x_0..x_{n-1} (x_{n-1} not yet fed):
  draft   feed x_{n-1}, y_1, .., y_{k-1} through the layers up to the exit: its head
          proposes y_1..y_k (greedy, or sampled from the exit's distribution q_i under the
          request's temperature, top-k and top-p); those layers' K/V are kept, deeper
          layers owe them. With a draft threshold, a row stops drafting (k is smaller)
          after a draft the exit is not confident about (Draft & Verify's adaptive length).
  verify  feed y_k: one full-depth pass in which every deeper layer processes the k+1
          owed positions together (the decoder's recomputation path), giving the full
          model's next-token logits z_0..z_k at positions n-1..n-1+k.
  accept  greedy: the longest prefix with y_i == argmax z_{i-1}, then argmax z_a.
          sampled: speculative rejection sampling (Leviathan et al. 2023): y_i is kept with
          probability min(1, p_{i-1}(y_i) / q_i(y_i)), p the full model's distribution
          under the same sampling settings; at the first rejection the token is drawn from
          norm(max(0, p - q)), after k acceptances from p_k. Each token is then distributed
          exactly as sampling at full depth would draw it.
          Then crop every layer's cache to n + a positions: rejected drafts leave nothing.
Rows of a batch draft in lockstep and accept independently.

With `dynamic` (DEL, arXiv 2504.05598), `DraftTuner` tracks, per exit, the online rate at
which its drafts are accepted (measured on every verification pass for the exits at or
below the deepest candidate, at the cost of their heads on the verified positions every
`probe_every` rounds) and picks, before each round, the exit and draft length with the
most expected tokens per unit of work: (1 - a^(k+1)) / (1 - a) tokens for k drafts of
cost d/L each and a verification.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from megatron.early_exit.inference.decoder import Decoder, ExitPolicy
from megatron.early_exit.inference.layers import exit_logits, to_device
from megatron.early_exit.inference.sampling import _filter_top_k_top_p


def sampling_probs(logits: torch.Tensor, sampling) -> torch.Tensor:
    """[n, V] logits -> [n, V] the distribution tokens are drawn from (temperature, top-k, top-p)."""
    return _filter_top_k_top_p(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p).softmax(dim=-1)


def draft_tokens(
    decoder: Decoder, transcript, budgets: Dict[int, int], policy: ExitPolicy, threshold: float = 0.0
) -> Tuple[Dict[int, List[int]], Dict[int, List[torch.Tensor]]]:
    """Up to budgets[r] drafts per row (and, when sampling, the exit's distribution q [V] of
    each); a row stops early after a draft whose probability under the exit is below
    `threshold` (it is likely rejected, and every draft after it would go with it)."""
    sampled = not transcript.sampling.greedy
    drafts: Dict[int, List[int]] = {r: [] for r in budgets}
    probs: Dict[int, List[torch.Tensor]] = {r: [] for r in budgets}
    going = [r for r, k in budgets.items() if k > 0]
    while going:
        out = decoder.step(going, [[drafts[r][-1] if drafts[r] else transcript.last_token(r)] for r in going], policy)
        transcript.result.num_steps += 1
        if sampled:
            q = sampling_probs(out.logits, transcript.sampling)
            tokens = torch.cat(
                [
                    torch.multinomial(q[i : i + 1], 1, generator=transcript.generators[r]).view(1)
                    for i, r in enumerate(going)
                ]
            )  # each row from its own generator
            confidence = q.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) if threshold > 0 else torch.ones_like(q[:, 0])
            for i, r in enumerate(going):
                probs[r].append(q[i])
        elif threshold > 0:
            confidence, tokens = out.logits.float().softmax(dim=-1).max(dim=-1)
        else:
            tokens = out.logits.argmax(dim=-1)
            confidence = torch.ones_like(tokens, dtype=torch.float64)  # on the tokens' device: no copy
        picked = torch.stack([tokens.double(), confidence.double()], dim=-1).tolist()  # one read
        for r, (t, _) in zip(going, picked):
            drafts[r].append(int(t))
        going = [r for r, (_, c) in zip(going, picked) if len(drafts[r]) < budgets[r] and c >= threshold]
    return drafts, probs


def verify(decoder: Decoder, transcript, drafts: Dict[int, List[int]], observe=None) -> Dict[int, torch.Tensor]:
    """The full model's logits [k+1, V] at each row's owed positions (one full-depth pass)."""
    rows = list(drafts)
    newest = [[drafts[r][-1] if drafts[r] else transcript.last_token(r)] for r in rows]
    out = decoder.step(rows, newest, all_logits=True, observe=observe)
    transcript.result.num_steps += 1
    return dict(zip(rows, out.chunk_logits))


def accepted_length(drafts: List[int], targets: List[int]) -> int:
    a = 0
    while a < len(drafts) and drafts[a] == targets[a]:
        a += 1
    return a


def accept_sampled(drafts: List[int], q: List[torch.Tensor], p: torch.Tensor, generator) -> Tuple[int, int]:
    """Speculative rejection sampling: (accepted drafts a, the token drawn after them)
    for drafts y_1..y_k with draft distributions q [k][V] and target distributions p [k+1, V]."""
    k = len(drafts)
    if k:
        index = to_device(p.device, drafts)[0].unsqueeze(-1)
        ratio = (p[:k].gather(-1, index) / torch.stack(q).gather(-1, index)).squeeze(-1)  # p(y)/q(y) > 0: q drew y
        u = torch.rand(k, generator=generator, device=p.device)
        rejected = (u >= ratio).tolist()
        a = rejected.index(True) if True in rejected else k
    else:
        a = 0
    if a < k:  # the residual distribution norm(max(0, p - q)); q == p leaves no mass and never rejects
        residual = (p[a] - q[a]).clamp_min(0)
        dist = residual / residual.sum() if float(residual.sum()) > 0 else p[a]
    else:
        dist = p[k]
    return a, int(torch.multinomial(dist, 1, generator=generator))


class DraftTuner:
    """Picks the drafting exit and draft length per round from online acceptance rates
    (DEL); fixed at the strategy's exit and length when it is not dynamic."""

    def __init__(self, decoder: Decoder, strategy, probe_every: int = 4, decay: float = 0.9):
        self.decoder, self.strategy = decoder, strategy
        self.exits = sorted(decoder.exit_points) if strategy.dynamic else [strategy.exit_layer]
        self.rate = {n: 0.5 for n in self.exits}  # acceptance prior, moved by every probe
        self.rounds, self.probe_every, self.decay = 0, probe_every, decay
        self.current = strategy.exit_layer

    def choice(self) -> Tuple[int, int]:
        if not self.strategy.dynamic:
            return self.strategy.exit_layer, self.strategy.num_draft
        best, num_layers = None, self.decoder.num_layers
        for n in self.exits:
            a = min(self.rate[n], 0.99)
            depth = self.decoder.exit_points[n].depth
            for k in range(1, self.strategy.num_draft + 1):
                speed = ((1 - a ** (k + 1)) / (1 - a)) / (k * depth / num_layers + 1.0)
                if best is None or speed > best[0]:
                    best = (speed, n, k)
        self.current = best[1]
        return best[1], best[2]

    def observer(self, targets_of):
        """An `observe` hook for the verification pass that scores every candidate exit on
        the verified positions (every probe_every rounds; None otherwise)."""
        self.rounds += 1
        if not self.strategy.dynamic or (self.rounds - 1) % self.probe_every:
            return None
        points = {self.decoder.exit_points[n].depth: self.decoder.exit_points[n] for n in self.exits}
        seen: Dict[int, torch.Tensor] = {}

        def observe(depth, x, attention_output):
            point = points.get(depth)
            if point is not None:
                head_input = attention_output if point.head.has_mlp else None
                seen[point.layer_number] = exit_logits(self.decoder.model, point.head, point.layer, x, head_input)

        self.seen = seen
        return observe

    def update(self, chunks: Dict[int, torch.Tensor], rows_of, sampling) -> None:
        """After a probed verification: each exit's acceptance on the verified positions
        (greedy: its argmax is the full model's; sampled: 1 - total variation)."""
        seen, self.seen = getattr(self, "seen", None), None
        if not seen:
            return
        for n, logits in seen.items():  # [c, b, V]: row i's positions are the last k+1 of column i
            scores = []
            for i, (r, target) in enumerate(chunks.items()):
                # At and below the drafting exit only the newest position is recomputed.
                w = min(logits.shape[0], target.shape[0])
                mine, target = logits[-w:, i], target[-w:].float()
                if sampling.greedy:
                    scores.append((mine.argmax(-1) == target.argmax(-1)).float())
                else:
                    tv = 0.5 * (sampling_probs(mine, sampling) - sampling_probs(target, sampling)).abs().sum(-1)
                    scores.append(1 - tv)
            rate = float(torch.cat(scores).mean())
            self.rate[n] = self.decay * self.rate[n] + (1 - self.decay) * rate


def full_model_reads(chunks: Dict[int, torch.Tensor], top_n: int) -> Dict[int, Tuple[List, List, List, List]]:
    """The full model's greedy token, its log-probability and top_n alternatives at each row's
    verified positions, read from the device once for the batch (not once per row)."""
    logprobs = torch.log_softmax(torch.cat(list(chunks.values())).float(), dim=-1)  # [sum(k+1), V]
    best, tokens = logprobs.max(dim=-1)
    columns = [tokens.double().unsqueeze(-1), best.double().unsqueeze(-1)]
    if top_n > 0:
        top = logprobs.topk(top_n, dim=-1)
        columns += [top.indices.double(), top.values.double()]
    values, reads, offset = torch.cat(columns, dim=-1).tolist(), {}, 0
    for r, chunk in chunks.items():
        mine, offset = values[offset : offset + len(chunk)], offset + len(chunk)
        reads[r] = (
            [int(v[0]) for v in mine],
            [v[1] for v in mine],
            [[int(t) for t in v[2 : 2 + top_n]] for v in mine],
            [v[2 + top_n :] for v in mine],
        )
    return reads


def speculative_decode(decoder: Decoder, transcript, strategy) -> None:
    result, sampling = transcript.result, transcript.sampling
    tuner = DraftTuner(decoder, strategy)
    while transcript.going():
        exit_layer, num_draft = tuner.choice()
        policy = strategy.draft_policy(decoder, exit_layer)
        draft_depth = next(iter(policy.exits))
        # Never draft past the budget: the last token of a row needs no draft.
        budgets = {
            r: max(0, min(num_draft, transcript.max_new_tokens - len(result.tokens[r]) - 1)) for r in transcript.active
        }
        drafts, q = draft_tokens(decoder, transcript, budgets, policy, strategy.draft_threshold)
        chunks = verify(decoder, transcript, drafts, tuner.observer(drafts))
        tuner.update(chunks, drafts, sampling)
        greedy = full_model_reads(chunks, transcript.top_n) if sampling.greedy else None
        for r, row_drafts in drafts.items():
            committed = decoder.num_fed[r] - len(row_drafts)  # n: x_{n-1} sits at position n-1
            if greedy is not None:
                targets, logprobs, top_tokens, top_logprobs = greedy[r]
                a = accepted_length(row_drafts, targets)
                # The accepted drafts equal the full model's tokens: all a+1 new tokens are its.
                transcript.append(
                    r,
                    targets[: a + 1],
                    [draft_depth] * a + [decoder.num_layers],
                    logprobs[: a + 1],
                    top_tokens[: a + 1],
                    top_logprobs[: a + 1],
                )
            else:
                logits = chunks[r].float()  # [k+1, V]
                a, last = accept_sampled(row_drafts, q[r], sampling_probs(logits, sampling), transcript.generators[r])
                tokens = row_drafts[:a] + [last]
                # Log-probabilities (and alternatives) under the full model's own distribution.
                logprobs = torch.log_softmax(logits[: a + 1], dim=-1)
                chosen = logprobs.gather(-1, to_device(logits.device, tokens)[0].unsqueeze(-1)).squeeze(-1).tolist()
                top = (None, None)
                if transcript.top_n > 0:
                    best = logprobs.topk(transcript.top_n, dim=-1)
                    top = (best.indices.tolist(), best.values.tolist())
                transcript.append(r, tokens, [draft_depth] * a + [decoder.num_layers], chosen, *top)
            decoder.crop(r, committed + a)
            result.num_drafted += len(row_drafts)
            result.num_accepted += a
        if transcript.between_rounds is not None:
            transcript.between_rounds()
