"""A learned confidence measure (CALM's early-exit classifier): per exit, a logistic
classifier on the exit's hidden state and its distribution that predicts whether the
exit's token equals the final layer's.

    features  the exit's hidden state (RMS-normalised, the layer output the decoder tests)
              and three numbers from its distribution: top-1 probability, top-1 minus
              top-2, 1 - normalised entropy; or, with `use_logits=False`, the hidden state
              alone, so that an exit that does not fire never projects onto the vocabulary
    target    argmax(exit logits) == argmax(final logits), at every position of the
              training text, on the frozen model
The score is a probability of agreement, so one threshold means the same at every exit.
`tools/train_confidence_estimator.py` trains and writes it; `--confidence-estimator FILE`
(server, tools) or `attach(model, ConfidenceEstimator.load(...))` makes
`EarlyExit(measure="learned")` use it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from megatron.early_exit.inference.errors import InferenceConfigError

NUM_LOGIT_FEATURES = 3
_ATTRIBUTE = "confidence_estimator"


def features(logits: Optional[Tensor], hidden: Tensor) -> Tensor:
    """[b, V] exit logits (None: hidden state only) and [b, h] exit hidden state -> [b, h (+ 3)]."""
    h = hidden.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    if logits is None:
        return h
    log_p = torch.log_softmax(logits.float(), dim=-1)
    top2 = log_p.topk(2, dim=-1).values.exp()
    entropy = -(log_p.exp() * log_p).sum(-1) / math.log(logits.shape[-1])
    return torch.cat([h, top2[:, :1], top2[:, :1] - top2[:, 1:], (1 - entropy).unsqueeze(-1)], dim=-1)


class ConfidenceEstimator(torch.nn.Module):
    """One linear classifier per exit (by --exit-layer-nums entry)."""

    def __init__(self, hidden_size: int, exit_layers: Sequence[int], use_logits: bool = True,
                 gate_threshold: float = 0.5):
        super().__init__()
        self.hidden_size = hidden_size
        # measure gated_max_prob: rows scoring below it skip the exit's vocabulary projection
        self.gate_threshold = gate_threshold
        self.exit_layers = [int(n) for n in exit_layers]
        self.use_logits = use_logits
        width = hidden_size + (NUM_LOGIT_FEATURES if use_logits else 0)
        self.heads = torch.nn.ModuleDict({str(n): torch.nn.Linear(width, 1) for n in self.exit_layers})

    def forward(self, layer_number: int, logits: Optional[Tensor], hidden: Tensor) -> Tensor:
        """[b] probability that the exit's token is the final layer's."""
        head = self.heads[str(layer_number)]
        x = features(logits if self.use_logits else None, hidden).to(head.weight.device)
        return torch.sigmoid(head(x)).squeeze(-1)

    def gate(self, layer_number: int, hidden: Tensor) -> List[bool]:
        """Hidden-state classifier only: which rows score >= gate_threshold, in as few
        operations as an exit test that does not fire can afford (the sigmoid compared by
        its logit, the RMS normalisation fused)."""
        head = self.heads[str(layer_number)]
        h = torch.nn.functional.rms_norm(hidden.float(), (hidden.shape[-1],), eps=1e-6)
        g = min(max(self.gate_threshold, 1e-12), 1 - 1e-12)
        return (torch.nn.functional.linear(h, head.weight, head.bias) >= math.log(g / (1 - g))).view(-1).tolist()

    def save(self, path: str, metrics: Optional[Dict] = None) -> None:
        from safetensors.torch import save_file

        meta = {"hidden_size": str(self.hidden_size), "exit_layers": json.dumps(self.exit_layers),
                "use_logits": json.dumps(self.use_logits), "gate_threshold": json.dumps(self.gate_threshold),
                "metrics": json.dumps(metrics or {})}
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, path, metadata=meta)

    @classmethod
    def load(cls, path: str) -> "ConfidenceEstimator":
        from safetensors import SafetensorError, safe_open

        if not os.path.isfile(path):
            raise InferenceConfigError(f"--confidence-estimator: no file {path}")
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            estimator = cls(int(meta["hidden_size"]), json.loads(meta["exit_layers"]),
                            json.loads(meta.get("use_logits", "true")), float(json.loads(meta.get("gate_threshold", "0.5"))))
            estimator.load_state_dict(tensors)
        except (SafetensorError, KeyError, ValueError, RuntimeError) as e:
            raise InferenceConfigError(f"--confidence-estimator: {path} is not a confidence estimator ({e})") from None
        return estimator.eval()


def attach(model, estimator: ConfidenceEstimator) -> None:
    """Make `estimator` the model's learned measure. Checked against the model's exits; kept
    out of the model's modules so that checkpoints and state dicts do not change."""
    exits = sorted(int(n) for n in model.ee_config.exit_layer_nums)
    if estimator.hidden_size != model.config.hidden_size or sorted(estimator.exit_layers) != exits:
        raise InferenceConfigError(
            f"--confidence-estimator: trained for hidden size {estimator.hidden_size} and exits {estimator.exit_layers}, "
            f"the model has hidden size {model.config.hidden_size} and exits {exits}")
    weight = next(model.parameters())
    object.__setattr__(model, _ATTRIBUTE, estimator.to(device=weight.device))


def attached(model) -> Optional[ConfidenceEstimator]:
    return model.__dict__.get(_ATTRIBUTE)


# -- training ------------------------------------------------------------------------


@dataclass
class ExitSamples:
    features: Tensor  # [n, h + 3]
    agree: Tensor  # [n] 1.0 where the exit's token is the final layer's


def collect(model, sequences: Sequence[Sequence[int]], progress=None, use_logits: bool = True) -> Dict[int, ExitSamples]:
    """Features and targets of every exit at every position of `sequences`, from one
    full-depth prefill each through the decoder (the states it tests when decoding)."""
    from megatron.early_exit.inference.decoder import Decoder
    from megatron.early_exit.inference.generate import inference_context
    from megatron.early_exit.inference.layers import exit_logits

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
                    seen[point.layer_number] = (exit_logits(model, point.head, point.layer, x, head_input)[:, 0], x[:, 0])

            step = decoder.step([0], [list(seq)], all_logits=True, observe=observe)
            final = step.chunk_logits[0].argmax(-1)
            for n, (logits, hidden) in seen.items():
                out.setdefault(n, []).append((features(logits if use_logits else None, hidden),
                                              (logits.argmax(-1) == final).float()))
            if progress is not None and ((i + 1) % 8 == 0 or i + 1 == len(sequences)):
                progress(i + 1)
    return {n: ExitSamples(torch.cat([f for f, _ in parts]), torch.cat([a for _, a in parts])) for n, parts in out.items()}


def fit(samples: Dict[int, ExitSamples], hidden_size: int, steps: int = 200, weight_decay: float = 1e-3,
        seed: int = 0) -> ConfidenceEstimator:
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
