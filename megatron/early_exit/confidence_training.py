"""Training of the learned confidence measure (inference/learned_confidence.py), run by
tools/train_confidence_estimator.py: collect each exit's features and its agreement with the
final layer from full-depth prefills through the decoder, fit one logistic classifier per
exit, and report how well it predicts. Kept out of the inference package, which it runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from megatron.early_exit.inference.context import inference_context
from megatron.early_exit.inference.decoder import Decoder
from megatron.early_exit.inference.layers import exit_logits
from megatron.early_exit.inference.learned_confidence import ConfidenceEstimator, features


@dataclass
class ExitSamples:
    features: Tensor  # [n, h + 3]
    agree: Tensor  # [n] 1.0 where the exit's token is the final layer's


def collect(
    model, sequences: Sequence[Sequence[int]], progress=None, use_logits: bool = True
) -> Dict[int, ExitSamples]:
    """Features and targets of every exit at every position of `sequences`, from one
    full-depth prefill each through the decoder (the states it tests when decoding)."""
    out: Dict[int, List[Tuple[Tensor, Tensor]]] = {}
    with inference_context(model):
        for i, seq in enumerate(sequences):
            decoder = Decoder(model, 1, len(seq))
            seen: Dict[int, Tuple[Tensor, Tensor]] = {}  # layer number -> (logits, hidden) [c, V], [c, h]
            points = {p.depth: p for p in decoder.exit_points.values()}

            def observe(depth, x, attention_output):
                point = points.get(depth)
                if point is not None:
                    head_input = attention_output if point.head.has_mlp else None
                    logits = exit_logits(model, point.head, point.layer, x, head_input)
                    seen[point.layer_number] = (logits[:, 0], x[:, 0])

            step = decoder.step([0], [list(seq)], all_logits=True, observe=observe)
            final = step.chunk_logits[0].argmax(-1)
            for n, (logits, hidden) in seen.items():
                out.setdefault(n, []).append(
                    (features(logits if use_logits else None, hidden), (logits.argmax(-1) == final).float())
                )
            if progress is not None and ((i + 1) % 8 == 0 or i + 1 == len(sequences)):
                progress(i + 1)
    return {
        n: ExitSamples(torch.cat([f for f, _ in parts]), torch.cat([a for _, a in parts])) for n, parts in out.items()
    }


def fit(
    samples: Dict[int, ExitSamples], hidden_size: int, steps: int = 200, weight_decay: float = 1e-3, seed: int = 0
) -> ConfidenceEstimator:
    """Logistic regression per exit (L-BFGS on the mean binary cross-entropy); the features'
    width says whether the samples carry the logit features."""
    torch.manual_seed(seed)
    width = next(iter(samples.values())).features.shape[1]
    estimator = ConfidenceEstimator(hidden_size, sorted(samples), use_logits=width > hidden_size)
    for n, s in samples.items():
        head = estimator.heads[str(n)]
        torch.nn.init.zeros_(head.weight)
        rate = float(s.agree.mean().clamp(1e-3, 1 - 1e-3))
        torch.nn.init.constant_(head.bias, math.log(rate / (1 - rate)))
        opt = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

        def closure(head=head, s=s, opt=opt):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(head(s.features).squeeze(-1), s.agree)
            loss = loss + weight_decay * head.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    return estimator.eval()


def evaluate(estimator: ConfidenceEstimator, samples: Dict[int, ExitSamples]) -> Dict[int, Dict[str, float]]:
    """Per exit: agreement rate, the classifier's accuracy, and its log-loss."""
    result = {}
    with torch.no_grad():
        for n, s in samples.items():
            logit = estimator.heads[str(n)](s.features).squeeze(-1)
            result[n] = {
                "tokens": int(s.agree.numel()),
                "agreement": float(s.agree.mean()),
                "accuracy": float(((logit > 0).float() == s.agree).float().mean()),
                "log_loss": float(torch.nn.functional.binary_cross_entropy_with_logits(logit, s.agree)),
            }
    return result
