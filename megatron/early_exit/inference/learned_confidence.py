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
`tools/train_confidence_estimator.py` trains and writes it (confidence_training.py); `--confidence-estimator FILE`
(server, tools) or `attach(model, ConfidenceEstimator.load(...))` makes
`EarlyExit(measure="learned")` use it.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

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

    def __init__(
        self, hidden_size: int, exit_layers: Sequence[int], use_logits: bool = True, gate_threshold: float = 0.5
    ):
        super().__init__()
        self.hidden_size = hidden_size
        # measure gated_max_prob: rows scoring below it skip the exit's vocabulary projection
        self.gate_threshold = gate_threshold
        self.exit_layers = [int(n) for n in exit_layers]
        self.use_logits = use_logits
        width = hidden_size + (NUM_LOGIT_FEATURES if use_logits else 0)
        self.heads = torch.nn.ModuleDict({str(n): torch.nn.Linear(width, 1) for n in self.exit_layers})
        self._gate_cache: Dict[int, tuple] = {}

    def forward(self, layer_number: int, logits: Optional[Tensor], hidden: Tensor) -> Tensor:
        """[b] probability that the exit's token is the final layer's."""
        head = self.heads[str(layer_number)]
        x = features(logits if self.use_logits else None, hidden).to(head.weight.device)
        return torch.sigmoid(head(x)).squeeze(-1)

    def gate(self, layer_number: int, hidden: Tensor, threshold: Optional[float] = None) -> List[bool]:
        """Hidden-state classifier only: which rows [b, h] score >= `threshold` (None: the
        gate threshold), in as few operations as an exit test that does not fire can afford.
        The score is sigmoid(w . h / r + b) with r = rms(h), so it reaches t exactly when
        w . h >= (logit(t) - b) r: one matrix-vector product and one norm on the device,
        read once, compared on the host (rms_norm, linear and sigmoid cost 5x more at batch 1)."""
        threshold = self.gate_threshold if threshold is None else threshold
        if threshold <= 0:
            return [True] * hidden.shape[0]
        weight, bias = self._gate_weights(layer_number)
        h = hidden.to(weight.dtype)
        dots, norms = torch.stack([torch.mv(h, weight), torch.linalg.vector_norm(h, dim=-1)]).tolist()
        cut = math.log(threshold / (1 - threshold)) - bias if threshold < 1 else math.inf  # no score reaches 1
        width = h.shape[-1]
        return [d >= cut * math.sqrt(n * n / width + 1e-6) for d, n in zip(dots, norms)]

    def _gate_weights(self, layer_number: int):
        """(w [h], b as a float) of an exit's classifier, kept until its weights change."""
        head = self.heads[str(layer_number)]
        key = (layer_number, head.weight.device, head.weight._version, head.bias._version)
        cached = self._gate_cache.get(layer_number)
        if cached is None or cached[0] != key:
            cached = (key, (head.weight.detach().view(-1).float(), float(head.bias)))
            self._gate_cache[layer_number] = cached
        return cached[1]

    def save(self, path: str, metrics: Optional[Dict] = None) -> None:
        from safetensors.torch import save_file

        meta = {
            "hidden_size": str(self.hidden_size),
            "exit_layers": json.dumps(self.exit_layers),
            "use_logits": json.dumps(self.use_logits),
            "gate_threshold": json.dumps(self.gate_threshold),
            "metrics": json.dumps(metrics or {}),
        }
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
            estimator = cls(
                int(meta["hidden_size"]),
                json.loads(meta["exit_layers"]),
                json.loads(meta.get("use_logits", "true")),
                float(json.loads(meta.get("gate_threshold", "0.5"))),
            )
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
            f"--confidence-estimator: trained for hidden size {estimator.hidden_size} and exits "
            f"{estimator.exit_layers}, "
            f"the model has hidden size {model.config.hidden_size} and exits {exits}"
        )
    weight = next(model.parameters())
    object.__setattr__(model, _ATTRIBUTE, estimator.to(device=weight.device))


def attached(model) -> Optional[ConfidenceEstimator]:
    return model.__dict__.get(_ATTRIBUTE)
