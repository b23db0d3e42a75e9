"""EarlyExitConfig: where the exits are, what they are made of, and how their losses count.

Field names follow EE-LLM's command-line flags (`--exit-layer-nums` is
`exit_layer_nums`, and so on), so a Megatron user can map one to the other.
It sits beside megatron-core's TransformerConfig, which describes the backbone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import List, Optional

from megatron.early_exit.errors import ConfigError

WARMUP_STYLES = ("linear", "cosine")
CURRICULA = ("none", "rotational", "gradual")
LAYER_DROPOUT_STYLES = ("linear", "exp")


@dataclass
class EarlyExitConfig:
    exit_layer_nums: List[int] = field(default_factory=list)
    """Layers (1-based, global) that carry an exit."""

    exit_layer_weight: Optional[List[float]] = None
    """Final loss weight of each exit (default 1.0 each)."""

    exit_layer_weight_init: Optional[List[float]] = None
    """Weight of each exit at the start of the warm-up (default 0.0 each)."""

    exit_layer_weight_warmup_iters: int = 0
    """Iterations over which each weight moves from its init value to its final value."""

    exit_layer_weight_warmup_style: str = "linear"
    """Shape of the warm-up: linear `init + r*d`, cosine `init + 0.5*(cos(pi*(r+1))+1)*d`."""

    exit_layer_temperature: Optional[List[float]] = None
    """Logits of each exit are divided by its temperature (default 1.0 each)."""

    use_exit_norm: bool = False
    """Each exit starts with its own norm (of the model's normalization type)."""

    use_exit_mlp: bool = False
    """Each exit has its own MLP fed from its layer's post-attention norm (shares the attention)."""

    use_exit_block: bool = False
    """Each exit has a whole extra transformer layer."""

    untie_exit_output_weights: bool = False
    """Each exit has its own output projection instead of sharing the word embedding."""

    pre_exit: bool = False
    """An exit reads its layer's input instead of its output."""

    use_dynamic_exit_layer_weight: bool = False
    """Scale each token's exit loss by the exit's detached max probability."""

    # LayerSkip options (off by default).
    layer_dropout_max: float = 0.0
    """Largest layer-dropout probability (at the last layer), rising with depth; 0 disables."""

    layer_dropout_style: str = "linear"
    """How layer dropout rises with depth: linear or exp (LayerSkip's exponential scale)."""

    exit_curriculum: str = "none"
    """Which exits train at an iteration: none (all), rotational, gradual."""

    exit_curriculum_rotation: int = 2
    """Rotational curriculum: exit i trains at iteration t when (i - t) % rotation == 0."""

    exit_curriculum_iters: int = 0
    """Gradual curriculum: exits switch on from the deepest to the shallowest over this many iterations."""

    # Self-distillation (distillation.py; off by default).
    exit_distill_weight: float = 0.0
    """Share `a` of distillation in each exit's loss: (1-a) CE(labels) + a T^2 KL(final || exit), in [0, 1]."""

    exit_distill_temperature: float = 1.0
    """Temperature T of both distributions in the distillation term."""

    exit_distill_warmup_iters: int = 0
    """Iterations over which `a` rises from 0 to --exit-distill-weight."""

    exit_distill_warmup_style: str = "linear"
    """Shape of that rise (as --exit-layer-weight-warmup-style)."""

    def __post_init__(self):
        self.exit_layer_nums = [int(n) for n in self.exit_layer_nums]
        self.exit_layer_weight = self._per_exit("--exit-layer-weight", self.exit_layer_weight, 1.0)
        self.exit_layer_weight_init = self._per_exit("--exit-layer-weight-init", self.exit_layer_weight_init, 0.0)
        self.exit_layer_temperature = self._per_exit("--exit-layer-temperature", self.exit_layer_temperature, 1.0)
        self._validate_exits()
        self._validate_heads()
        self._validate_schedules()

    # -- validation ---------------------------------------------------------

    def _per_exit(self, flag: str, values: Optional[List[float]], default: float) -> List[float]:
        n = len(self.exit_layer_nums)
        if values is None or len(values) == 0:
            return [default] * n
        values = [float(v) for v in values]
        if len(values) != n:
            raise ConfigError(
                f"{flag} has {len(values)} values but --exit-layer-nums has {n} exits ({self.exit_layer_nums})"
            )
        return values

    def _validate_exits(self):
        nums = self.exit_layer_nums
        duplicates = sorted({x for x in nums if nums.count(x) > 1})
        if duplicates:
            raise ConfigError(f"--exit-layer-nums has duplicate exits: {duplicates}")
        if nums != sorted(nums):
            raise ConfigError(f"--exit-layer-nums must be in increasing order, got {nums}")
        if any(x < 1 for x in nums):
            raise ConfigError(f"--exit-layer-nums are 1-based layer numbers, got {nums}")
        self._validate_weights()

    def _validate_weights(self):
        # A negative weight is gradient ascent on that exit's loss; nan or inf poisons every gradient.
        for flag, values in (
            ("--exit-layer-weight", self.exit_layer_weight),
            ("--exit-layer-weight-init", self.exit_layer_weight_init),
        ):
            bad = [v for v in values if not (math.isfinite(v) and v >= 0)]
            if bad:
                raise ConfigError(f"{flag} must be finite and >= 0, got {bad[0]} (in {values})")
        bad = [t for t in self.exit_layer_temperature if not (math.isfinite(t) and t > 0)]
        if bad:
            raise ConfigError(
                f"--exit-layer-temperature must be > 0 and finite, got {bad[0]} (in {self.exit_layer_temperature})"
            )

    def _validate_heads(self):
        if self.use_exit_mlp and self.use_exit_block:
            raise ConfigError("--use-exit-mlp and --use-exit-block cannot be combined: choose one exit structure")
        if self.use_exit_mlp and self.pre_exit:
            raise ConfigError(
                "--use-exit-mlp cannot be combined with --pre-exit: the exit MLP is fed from its layer's attention"
            )

    def _validate_schedules(self):
        if self.exit_layer_weight_warmup_style not in WARMUP_STYLES:
            raise ConfigError(
                f"--exit-layer-weight-warmup-style must be one of {WARMUP_STYLES}, got "
                f"{self.exit_layer_weight_warmup_style!r}"
            )
        if self.exit_layer_weight_warmup_iters < 0:
            raise ConfigError(
                f"--exit-layer-weight-warmup-iters must be >= 0, got {self.exit_layer_weight_warmup_iters}"
            )
        if not 0.0 <= self.layer_dropout_max < 1.0:
            raise ConfigError(f"--layer-dropout-max must be in [0, 1), got {self.layer_dropout_max}")
        if self.layer_dropout_style not in LAYER_DROPOUT_STYLES:
            raise ConfigError(
                f"--layer-dropout-style must be one of {LAYER_DROPOUT_STYLES}, got {self.layer_dropout_style!r}"
            )
        if self.exit_curriculum not in CURRICULA:
            raise ConfigError(f"--exit-curriculum must be one of {CURRICULA}, got {self.exit_curriculum!r}")
        if self.exit_curriculum == "rotational" and self.exit_curriculum_rotation < 1:
            raise ConfigError(f"--exit-curriculum-rotation must be >= 1, got {self.exit_curriculum_rotation}")
        if self.exit_curriculum == "gradual" and self.exit_curriculum_iters < 1:
            raise ConfigError("--exit-curriculum gradual needs --exit-curriculum-iters >= 1")
        self._validate_distillation()

    def _validate_distillation(self):
        if not (math.isfinite(self.exit_distill_weight) and 0.0 <= self.exit_distill_weight <= 1.0):
            raise ConfigError(f"--exit-distill-weight must be in [0, 1], got {self.exit_distill_weight}")
        if not (math.isfinite(self.exit_distill_temperature) and self.exit_distill_temperature > 0):
            raise ConfigError(f"--exit-distill-temperature must be > 0 and finite, got {self.exit_distill_temperature}")
        if self.exit_distill_warmup_iters < 0:
            raise ConfigError(f"--exit-distill-warmup-iters must be >= 0, got {self.exit_distill_warmup_iters}")
        if self.exit_distill_warmup_style not in WARMUP_STYLES:
            raise ConfigError(
                f"--exit-distill-warmup-style must be one of {WARMUP_STYLES}, got {self.exit_distill_warmup_style!r}"
            )
        if self.exit_distill_weight > 0 and not self.exit_layer_nums:
            raise ConfigError("--exit-distill-weight needs --exit-layer-nums")

    def validate_against(self, num_layers: int) -> None:
        """Checks that need the backbone's depth."""
        bad = [x for x in self.exit_layer_nums if not 1 <= x <= num_layers]
        if bad:
            raise ConfigError(f"--exit-layer-nums {bad} outside 1..--num-layers ({num_layers})")

    # -- as flags -----------------------------------------------------------

    # Fields that decide the exits' parameters and what they read: they must agree with
    # a checkpoint's. The loss weights and schedules may change between runs.
    STRUCTURE_FIELDS = (
        "exit_layer_nums",
        "use_exit_norm",
        "use_exit_mlp",
        "use_exit_block",
        "untie_exit_output_weights",
        "pre_exit",
    )

    @classmethod
    def flag_names(cls) -> List[str]:
        """The exit flags' names (`exit_layer_nums` is --exit-layer-nums): the fields."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_flags(cls, values) -> "EarlyExitConfig":
        """From flag values by name (a namespace's vars or stored flags); missing ones default."""
        return cls(**{k: values[k] for k in cls.flag_names() if k in values and values[k] is not None})

    def to_flags(self) -> dict:
        return {k: getattr(self, k) for k in self.flag_names()}

    def structure_differences(self, other: "EarlyExitConfig") -> List[str]:
        """`--flag: checkpoint X, now Y` for each structure field that differs (self: the checkpoint's)."""
        return [
            f"--{k.replace('_', '-')}: checkpoint {getattr(self, k)}, now {getattr(other, k)}"
            for k in self.STRUCTURE_FIELDS
            if k != "exit_layer_nums" and getattr(self, k) != getattr(other, k)
        ]

    # -- schedules ----------------------------------------------------------

    @property
    def num_exits(self) -> int:
        return len(self.exit_layer_nums)

    @property
    def has_exits(self) -> bool:
        return self.num_exits > 0

    def exit_weights(self, iteration: int) -> List[float]:
        """Loss weight of each exit at `iteration` (warm-up schedule, then curriculum)."""
        weights = [
            self._warmed_up(init, final, iteration)
            for init, final in zip(self.exit_layer_weight_init, self.exit_layer_weight)
        ]
        active = self.active_exits(iteration)
        return [w if on else 0.0 for w, on in zip(weights, active)]

    def _warmed_up(self, init: float, final: float, iteration: int) -> float:
        return _warm_up(
            init, final, iteration, self.exit_layer_weight_warmup_iters, self.exit_layer_weight_warmup_style
        )

    def distill_weight(self, iteration: int) -> float:
        """Share of distillation in each exit's loss at `iteration` (0: labels only)."""
        return _warm_up(
            0.0, self.exit_distill_weight, iteration, self.exit_distill_warmup_iters, self.exit_distill_warmup_style
        )

    def active_exits(self, iteration: int) -> List[bool]:
        """LayerSkip curricula: which exits contribute a loss at `iteration`."""
        n = self.num_exits
        if self.exit_curriculum == "rotational":
            return [(i - iteration) % self.exit_curriculum_rotation == 0 for i in range(n)]
        if self.exit_curriculum == "gradual":
            # Exit i (0 = shallowest) switches on at T * (n-1-i) / n: the deepest first.
            return [iteration >= self.exit_curriculum_iters * (n - 1 - i) / n for i in range(n)]
        return [True] * n

    def layer_dropout_prob(self, layer_number: int, num_layers: int) -> float:
        """LayerSkip: dropout probability of a layer (1-based), 0 at the first layer, max at the last."""
        if self.layer_dropout_max == 0.0 or num_layers == 1:
            return 0.0
        depth = (layer_number - 1) / (num_layers - 1)
        if self.layer_dropout_style == "linear":
            scale = depth
        else:
            scale = math.exp(depth * math.log(2)) - 1
        return self.layer_dropout_max * scale


def _warm_up(init: float, final: float, iteration: int, iters: int, style: str) -> float:
    """linear `init + r*d`, cosine `init + 0.5*(cos(pi*(r+1))+1)*d`, r = iteration / iters (at most 1)."""
    if iters == 0:
        return final
    r = min(iteration / iters, 1.0)
    d = final - init
    if style == "linear":
        return init + r * d
    return init + 0.5 * (math.cos(math.pi * (r + 1)) + 1) * d
